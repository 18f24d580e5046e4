"""Transfer operators between depth levels of a forward-Euler ResNet.

Level ``l`` has ``depth_l`` blocks and step ``h_l = T / depth_l``; a coarser level
halves the depth.  Parameters stacked along time (dimension 0 of the field's
tensors) are transferred in time; the other parameters (input and output
layers) are shared by all levels and transferred by the identity.

With the prolongation ``P`` (coarse -> fine), the operators are

- ``P``: piecewise-constant (each coarse block duplicated) or linear in time
  (blocks seen as values at step midpoints, linear interpolation, constant
  extrapolation at the two ends);
- gradient restriction ``R = P^T``, the adjoint of ``P`` in the Euclidean inner
  product, so that ``d/ds_c f(x + P s_c)|_{s_c=0} = R grad f(x)`` exactly (the
  first-order consistency of the coarse model);
- iterate restriction ``Pi = (h_fine / h_coarse) P^T = P^T / 2`` ("average":
  averaging pairs for piecewise-constant ``P``, full weighting for linear ``P``),
  the adjoint of ``P`` in the ``L^2(0, T)`` inner products ``h_l sum_k u_k v_k``,
  or ``"injection"`` (keep the even fine blocks).

See Kopaničáková & Krause, "Globally convergent multilevel training of deep
residual networks", SIAM J. Sci. Comput. (2023), Sec. 3, and Gratton, Sartenaer
& Toint, "Recursive trust-region methods for multiscale nonlinear optimization",
SIAM J. Optim. 19 (2008).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Transfer", "prolongation_matrix"]


def prolongation_matrix(n_coarse: int, kind: str = "constant", dtype=torch.float64) -> torch.Tensor:
    """The ``2 n_coarse x n_coarse`` matrix prolongating per-block values in time.

    Parameters
    ----------
    n_coarse : int
        Number of coarse blocks.
    kind : {"constant", "linear"}
        Piecewise-constant duplication or linear interpolation between step midpoints.

    Returns
    -------
    Tensor
        Rows sum to one (constants are preserved); every column sums to two.
    """
    P = torch.zeros(2 * n_coarse, n_coarse, dtype=dtype)
    j = torch.arange(n_coarse)
    if kind == "constant":
        P[2 * j, j] = 1.0
        P[2 * j + 1, j] = 1.0
    elif kind == "linear":
        # fine midpoint (2j + 1/2) h sits a quarter coarse step left of coarse midpoint j
        P[2 * j, j] = 0.75
        P[2 * j + 1, j] = 0.75
        left, right = torch.clamp(j - 1, min=0), torch.clamp(j + 1, max=n_coarse - 1)
        P[2 * j, left] += 0.25
        P[2 * j + 1, right] += 0.25
    else:
        raise ValueError(f"Invalid prolongation {kind!r}; choose 'constant' or 'linear'")
    return P


class Transfer:
    """Prolongation and restrictions between a fine and a coarse parameter vector.

    Vectors are flat concatenations of the model parameters in ``parameters()``
    order (``torch.nn.utils.parameters_to_vector``).

    Parameters
    ----------
    fine_shapes, coarse_shapes : sequence of torch.Size
        Parameter shapes on each level.
    time_flags : sequence of bool
        Whether each parameter is stacked along time (dimension 0 = blocks).
    prolongation : {"constant", "linear"}
        Interpolation in time.
    restriction : {"average", "injection"}
        Iterate restriction: ``P^T / 2`` or even-block injection.

    Examples
    --------
    >>> fine = ResNet(4, 8, 16, 2).double(); coarse = fine.with_depth(8)
    >>> tr = Transfer.between(fine, coarse)
    >>> xc = tr.restrict(parameters_to_vector(fine.parameters()))
    """

    def __init__(self, fine_shapes: Sequence[torch.Size], coarse_shapes: Sequence[torch.Size],
                 time_flags: Sequence[bool], *, prolongation: str = "constant",
                 restriction: str = "average", dtype=torch.float64) -> None:
        if restriction not in ("average", "injection"):
            raise ValueError(f"Invalid restriction {restriction!r}; choose 'average' or 'injection'")
        self.fine_shapes = [torch.Size(s) for s in fine_shapes]
        self.coarse_shapes = [torch.Size(s) for s in coarse_shapes]
        self.time_flags = list(time_flags)
        if not (len(self.fine_shapes) == len(self.coarse_shapes) == len(self.time_flags)):
            raise ValueError("fine_shapes, coarse_shapes and time_flags must have the same length")
        self.kind, self.restriction = prolongation, restriction
        self._P: torch.Tensor | None = None
        for fs, cs, timed in zip(self.fine_shapes, self.coarse_shapes, self.time_flags, strict=True):
            if timed:
                if fs[1:] != cs[1:] or fs[0] != 2 * cs[0]:
                    raise ValueError(f"time-stacked shapes {tuple(fs)} and {tuple(cs)} are not a 2:1 pair")
                if self._P is None:
                    self._P = prolongation_matrix(cs[0], prolongation, dtype)
                elif self._P.shape[1] != cs[0]:
                    raise ValueError("time-stacked parameters disagree on the number of blocks")
            elif fs != cs:
                raise ValueError(f"shared parameter shapes differ: {tuple(fs)} vs {tuple(cs)}")
        if self._P is None:
            raise ValueError("no time-stacked parameters: nothing to coarsen")
        self.n_fine = sum(s.numel() for s in self.fine_shapes)
        self.n_coarse = sum(s.numel() for s in self.coarse_shapes)
        # ||P||_2 bounds ||P s_c|| by ||P|| ||s_c|| (the coarse trust-region radius).
        self.norm = max(1.0, float(torch.linalg.matrix_norm(self._P, ord=2)))

    @classmethod
    def between(cls, fine: torch.nn.Module, coarse: torch.nn.Module, **kwargs) -> Transfer:
        """Operators between two ResNets of this package (``coarse.depth * 2 == fine.depth``)."""
        return cls([p.shape for p in fine.parameters()], [p.shape for p in coarse.parameters()],
                   fine.time_parameter_flags(), **kwargs)

    @property
    def P(self) -> torch.Tensor:
        """The 1-D prolongation matrix in time (``2 n x n``)."""
        assert self._P is not None
        return self._P

    def _apply(self, v: torch.Tensor, src, op) -> torch.Tensor:
        out, i = [], 0
        for s, timed in zip(src, self.time_flags, strict=True):
            chunk = v[i:i + s.numel()].view(s)
            i += s.numel()
            out.append((op(chunk) if timed else chunk).reshape(-1))
        assert i == v.numel(), "vector length does not match the parameter shapes"
        return torch.cat(out)

    def _time(self, M: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        M = M.to(chunk.dtype)
        return (M @ chunk.reshape(chunk.shape[0], -1)).reshape(M.shape[0], *chunk.shape[1:])

    def prolong(self, xc: torch.Tensor) -> torch.Tensor:
        """``P x_c``: coarse parameters (or steps) to the fine level."""
        return self._apply(xc, self.coarse_shapes, lambda c: self._time(self.P, c))

    def restrict_gradient(self, gf: torch.Tensor) -> torch.Tensor:
        """``R g = P^T g``: the adjoint of :meth:`prolong` (used for gradients)."""
        return self._apply(gf, self.fine_shapes, lambda c: self._time(self.P.T, c))

    def restrict(self, xf: torch.Tensor) -> torch.Tensor:
        """``Pi x``: fine parameters to the coarse level (``P^T / 2`` or injection)."""
        if self.restriction == "injection":
            return self._apply(xf, self.fine_shapes, lambda c: c[0::2])
        return self._apply(xf, self.fine_shapes,
                           lambda c: self._time(0.5 * self.P.T, c))
