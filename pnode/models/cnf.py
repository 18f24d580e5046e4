"""Continuous normalizing flows (FFJORD-style) on top of :func:`pnode.odeint`.

The flow integrates the augmented state ``(z, delta)`` from ``t = 0`` (data) to
``t = T`` (latent)::

    dz/dt     = f(t, z)
    ddelta/dt = -trace(df/dz)

so that ``log p(x) = log N(z(T); 0, I) - delta(T)`` (instantaneous change of
variables, Chen et al., NeurIPS 2018; Grathwohl et al., "FFJORD", ICLR 2019).
The trace is exact (one backward pass per dimension) or Hutchinson's unbiased
estimate ``E[e^T (df/dz) e]`` with one noise vector per sample, held fixed for a
whole solve (the ODE must not change during a step or its adjoint).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adjoint import odeint

__all__ = ["ConcatMLP", "CNFField", "CNF", "standard_normal_logprob"]


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last axis."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class ConcatMLP(nn.Module):
    """An MLP ``f(t, z)`` that sees time as an extra input of every layer.

    Parameters
    ----------
    dim : int
        State dimension.
    hidden : sequence of int
        Hidden widths.
    activation : {"softplus", "tanh"}
        Smooth activations keep ``trace(df/dz)`` differentiable.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 64), activation: str = "softplus") -> None:
        super().__init__()
        acts = {"softplus": nn.Softplus, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"Invalid activation {activation!r}; valid: {sorted(acts)}")
        widths = (dim, *hidden, dim)
        self.layers = nn.ModuleList(nn.Linear(a + 1, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.act = acts[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = t.to(z.dtype).expand(*z.shape[:-1], 1)
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(torch.cat([h, tt], dim=-1))
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class CNFField(nn.Module):
    """The augmented right-hand side ``(z, delta) -> (f(t, z), -trace(df/dz))``.

    Parameters
    ----------
    net : nn.Module
        ``net(t, z) -> dz/dt`` for ``z`` of shape ``[batch, dim]``.
    trace : {"exact", "hutchinson"}
        Exact trace (``dim`` backward passes) or Hutchinson's estimator with
        :attr:`noise`.

    Notes
    -----
    The engine evaluates the right-hand side without autograd in the forward
    sweep; this field turns gradients on locally to differentiate ``net``, and
    builds that derivative with ``create_graph=True`` so the adjoint's
    vector-Jacobian products see it.
    """

    def __init__(self, net: nn.Module, trace: str = "exact") -> None:
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"Invalid trace {trace!r}; valid: 'exact', 'hutchinson'")
        self.net = net
        self.trace = trace
        #: Hutchinson noise ``[batch, dim]``, fixed for one solve and its backward pass
        self.noise: torch.Tensor | None = None

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z, _ = state
        with torch.enable_grad():
            zr = z if z.requires_grad else z.detach().requires_grad_(True)
            f = self.net(t, zr)
            if self.trace == "exact":
                tr = torch.zeros(z.shape[0], dtype=f.dtype)
                for i in range(z.shape[-1]):
                    (g,) = torch.autograd.grad(f[:, i].sum(), zr, create_graph=True)
                    tr = tr + g[:, i]
            else:
                if self.noise is None or self.noise.shape != z.shape:
                    raise ValueError("CNFField(trace='hutchinson') needs .noise of the state's "
                                     f"shape {tuple(z.shape)}; CNF.log_prob sets it")
                (g,) = torch.autograd.grad(f, zr, self.noise.to(f.dtype), create_graph=True)
                tr = (g * self.noise).sum(-1)
        return f, -tr.unsqueeze(-1)


class _Reversed(nn.Module):
    """``s -> -field(T - s, .)``: integrates the flow from ``T`` back to 0 with increasing times."""

    def __init__(self, field: nn.Module, T: float) -> None:
        super().__init__()
        self.field, self.T = field, T

    def forward(self, s: torch.Tensor, state):
        dz, dd = self.field(self.T - s, state)
        return -dz, -dd


class CNF(nn.Module):
    """A continuous normalizing flow with a standard normal base density.

    Parameters
    ----------
    dim : int
        Data dimension.
    hidden : tuple of int
        Hidden widths of the :class:`ConcatMLP` field.
    T : float
        Integration time of the flow.
    trace : {"exact", "hutchinson"}
        Divergence estimator used in training (see :class:`CNFField`).
    activation : str
        Activation of the field.
    **odeint_kwargs
        Options of :func:`pnode.odeint` (``method``, ``options``, ``rtol``, ...).

    Examples
    --------
    >>> flow = CNF(2, hidden=(64, 64), method="rk4", options={"step_size": 0.1}).double()
    >>> loss = -flow.log_prob(x).mean()     # nats per sample
    >>> loss.backward()                     # PETSc TSAdjoint
    >>> x_new = flow.sample(1000)
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 64), *, T: float = 1.0,
                 trace: str = "exact", activation: str = "softplus", **odeint_kwargs: Any) -> None:
        super().__init__()
        self.dim = dim
        self.T = float(T)
        self.field = CNFField(ConcatMLP(dim, hidden, activation), trace)
        self.odeint_kwargs = odeint_kwargs

    def _times(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([0.0, self.T], dtype=dtype)

    def log_prob(self, x: torch.Tensor, *, trace: str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``log p(x)`` in nats for a batch ``[n, dim]``; differentiable by the discrete adjoint.

        Parameters
        ----------
        x : Tensor
            Samples ``[n, dim]``.
        trace : {"exact", "hutchinson"}, optional
            Override the training estimator (e.g. exact for evaluation).
        generator : torch.Generator, optional
            Source of the Hutchinson noise (Rademacher).
        """
        saved = self.field.trace
        if trace is not None:
            self.field.trace = trace
        try:
            if self.field.trace == "hutchinson":
                bits = torch.randint(0, 2, x.shape, generator=generator)
                self.field.noise = (2 * bits - 1).to(x.dtype)
            delta0 = torch.zeros(x.shape[0], 1, dtype=x.dtype)
            z, delta = odeint(self.field, (x, delta0), self._times(x.dtype), **self.odeint_kwargs)
        finally:
            self.field.trace = saved
        return standard_normal_logprob(z[-1]) - delta[-1, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw ``n`` samples by integrating base samples from ``T`` back to 0."""
        dtype = dtype or next(self.parameters()).dtype
        z = torch.randn(n, self.dim, generator=generator).to(dtype)
        saved = self.field.trace
        self.field.trace = "exact" if self.dim <= 2 else "hutchinson"
        if self.field.trace == "hutchinson":
            self.field.noise = torch.zeros(n, self.dim, dtype=dtype)  # the trace is not needed here
        try:
            x, _ = odeint(_Reversed(self.field, self.T), (z, torch.zeros(n, 1, dtype=dtype)),
                          self._times(dtype), **self.odeint_kwargs)
        finally:
            self.field.trace = saved
        return x[-1]
