"""Kronecker factors of one layer: sample matrices, accumulation, damping and inversion.

For a layer ``z = W a`` (``nn.Linear``; ``nn.Conv2d`` through its unfolded
patches, as in KFC, Grosse & Martens 2016) with a bias folded into ``W`` as a
last column, the gradient of a batch-mean loss is ``dW = sum_n g_n a_n^T`` over
the rows ``n`` (samples times spatial positions) of the activation matrix
``a`` and of the output-gradient matrix ``g``.  K-FAC (Martens & Grosse 2015)
approximates the curvature by ``A ⊗ G`` with

    A = mean_n a_n a_n^T,        G = B * sum_n g_n g_n^T,

where ``B`` is the batch size (``g`` carries the loss's ``1/B``, so ``G`` is the
mean per-sample covariance of the output gradients).  With ``vec`` stacking
columns, ``(A ⊗ G)^{-1} vec(dW) = vec(G^{-1} dW A^{-1})``.

Damping (``lam > 0``):

- ``"eig"``: exact Tikhonov damping ``(A ⊗ G + lam I)^{-1}``, from the
  eigendecompositions ``A = Q_A D_A Q_A^T``, ``G = Q_G D_G Q_G^T``:
  ``Q_G [(Q_G^T dW Q_A) / (d_G d_A^T + lam)] Q_A^T``.
- ``"cholesky"``: factored Tikhonov damping ``(A + pi sqrt(lam) I) ⊗ (G + sqrt(lam)/pi I)``
  with ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, sec. 6.3).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED_LAYERS", "activation_matrix", "grad_matrix", "batch_size", "Factors"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def batch_size(module: nn.Module, x: torch.Tensor) -> int:
    """Number of samples a layer input holds (first axis; 1 for an unbatched input)."""
    if isinstance(module, nn.Conv2d):
        return x.shape[0] if x.dim() == 4 else 1
    return x.shape[0] if x.dim() >= 2 else 1


def activation_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows ``a_n`` of a layer's input (patches for Conv2d), with a ones column for a bias."""
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if module.padding_mode != "zeros":
            raise ValueError(f"Invalid layer {module}: SNOpt supports Conv2d with padding_mode='zeros'")
        if module.groups != 1:
            raise ValueError(f"Invalid layer {module}: SNOpt supports Conv2d with groups=1")
        pad = module.padding
        if isinstance(pad, str):
            raise ValueError(f"Invalid layer {module}: SNOpt needs numeric Conv2d padding")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad,
                        stride=module.stride)  # [B, C*kh*kw, L]
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        a = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


def grad_matrix(module: nn.Module, gy: torch.Tensor) -> torch.Tensor:
    """Rows ``g_n`` of the gradient with respect to a layer's output."""
    gy = gy.detach()
    if isinstance(module, nn.Conv2d):
        if gy.dim() == 3:
            gy = gy.unsqueeze(0)
        return gy.flatten(2).transpose(1, 2).reshape(-1, gy.shape[1])
    return gy.reshape(-1, gy.shape[-1])


def weight_matrix_grad(module: nn.Module) -> torch.Tensor | None:
    """``dW`` as a matrix ``[out, in (+1)]`` from the parameters' ``.grad`` (None if absent)."""
    w = module.weight
    if w.grad is None:
        return None
    gw = w.grad.reshape(w.shape[0], -1)
    if module.bias is not None:
        gb = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
        gw = torch.cat([gw, gb.reshape(-1, 1)], dim=1)
    return gw


def split_matrix(module: nn.Module, m: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`weight_matrix_grad`: ``[dweight, (dbias)]`` shaped like the parameters."""
    w = module.weight
    if module.bias is None:
        return [m.reshape(w.shape)]
    return [m[:, :-1].reshape(w.shape), m[:, -1].reshape(module.bias.shape)]


class Factors:
    """Kronecker factors of one layer, their running averages and their inverse.

    Parameters
    ----------
    d_in, d_out : int
        Sizes of ``A`` (inputs, plus one for a bias) and ``G`` (outputs).
    dtype : torch.dtype
        Dtype of the factors (that of the layer's weight).
    """

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype) -> None:
        self.d_in, self.d_out, self.dtype = d_in, d_out, dtype
        # factors of the current collection (summed over events, or over batches)
        self.A_new = torch.zeros(d_in, d_in, dtype=dtype)
        self.G_new = torch.zeros(d_out, d_out, dtype=dtype)
        self.n_new = 0  # contributions in A_new/G_new
        self.samples_new = 0  # batch size of those contributions (for combining uneven shards)
        # running averages and their inverse
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self.inverse: dict[str, torch.Tensor] | None = None

    # -- accumulation ----------------------------------------------------------------
    def add(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, weight: float = 1.0) -> None:
        """Add ``weight * A_batch`` and ``weight * G_batch`` of one (input, output-gradient) pair."""
        a = activation_matrix(module, x).to(self.dtype)
        g = grad_matrix(module, gy).to(self.dtype)
        b = batch_size(module, x)
        self.A_new.addmm_(a.t(), a, alpha=weight / a.shape[0])
        self.G_new.addmm_(g.t(), g, alpha=weight * b)
        self.n_new += 1
        self.samples_new = b

    def fold(self, decay: float) -> None:
        """Move the collected factors into the running averages (the first collection sets them)."""
        if self.n_new == 0:
            return
        if self.A is None:
            self.A, self.G = self.A_new.clone(), self.G_new.clone()
        else:
            self.A.mul_(decay).add_(self.A_new, alpha=1 - decay)
            self.G.mul_(decay).add_(self.G_new, alpha=1 - decay)
        self.clear_new()

    def clear_new(self) -> None:
        self.A_new.zero_()
        self.G_new.zero_()
        self.n_new = 0
        self.samples_new = 0

    # -- inversion -------------------------------------------------------------------
    def invert(self, damping: float, method: str, name: str = "layer") -> None:
        """Precompute what :meth:`precondition` needs, with damping ``damping`` (see module doc)."""
        if self.A is None:
            return
        self.inverse = invert(self.A, self.G, damping, method, name)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """The preconditioned gradient matrix, or ``grad`` itself before any factor exists."""
        if self.inverse is None:
            return grad
        return precondition(self.inverse, grad)


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.t())


def invert(A: torch.Tensor, G: torch.Tensor, damping: float, method: str,
           name: str = "layer") -> dict[str, torch.Tensor]:
    """Inverse data for ``A ⊗ G`` with damping ``damping``; see the module docstring.

    Raises
    ------
    FloatingPointError
        A factor holds NaN or Inf.
    """
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(G).all())):
        raise FloatingPointError(f"SNOpt: the Kronecker factors of {name} hold NaN or Inf")
    if method == "eig":
        dA, QA = torch.linalg.eigh(_sym(A).double())
        dG, QG = torch.linalg.eigh(_sym(G).double())
        # eigenvalues of a covariance are >= 0; clamp round-off
        dA, dG = dA.clamp_min(0), dG.clamp_min(0)
        scale = 1.0 / (torch.outer(dG, dA) + damping)
        # contiguous: the arrays are broadcast as raw buffers under MPI (eigh returns column-major)
        return {"QA": QA.to(A.dtype).contiguous(), "QG": QG.to(A.dtype).contiguous(),
                "scale": scale.to(A.dtype).contiguous()}
    # factored Tikhonov damping, Cholesky inverses; on failure raise the damping tenfold
    tA = float(torch.trace(A)) / A.shape[0]
    tG = float(torch.trace(G)) / G.shape[0]
    pi = math.sqrt(tA / tG) if tA > 0 and tG > 0 else 1.0
    lam = damping
    for attempt in range(8):
        eA, eG = pi * math.sqrt(lam), math.sqrt(lam) / pi
        IA = torch.eye(A.shape[0], dtype=torch.float64)
        IG = torch.eye(G.shape[0], dtype=torch.float64)
        LA, infoA = torch.linalg.cholesky_ex(_sym(A).double() + eA * IA)
        LG, infoG = torch.linalg.cholesky_ex(_sym(G).double() + eG * IG)
        if int(infoA) == 0 and int(infoG) == 0:
            if attempt:
                warnings.warn(f"SNOpt: a Kronecker factor of {name} is numerically singular; "
                              f"Cholesky succeeded with damping raised to {lam:.3g}", RuntimeWarning,
                              stacklevel=3)
            return {"A_inv": torch.cholesky_inverse(LA).to(A.dtype).contiguous(),
                    "G_inv": torch.cholesky_inverse(LG).to(A.dtype).contiguous()}
        lam *= 10.0
    raise FloatingPointError(f"SNOpt: the Kronecker factors of {name} are not positive definite even "
                             f"with damping {lam:.3g}; use inverse='eig'")


def precondition(inverse: dict[str, torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    """Apply the damped inverse of ``A ⊗ G`` to a gradient matrix ``[d_out, d_in]``."""
    if "QA" in inverse:
        QA, QG = inverse["QA"], inverse["QG"]
        return QG @ ((QG.t() @ grad @ QA) * inverse["scale"]) @ QA.t()
    return inverse["G_inv"] @ grad @ inverse["A_inv"]
