"""Pieces of :class:`pnode.control.SNOpt` that are not hook or step bookkeeping.

Hyperparameter validation, discovery of the preconditioned layers, the base
first-order rules, and the cross-rank reduction and inversion of the Kronecker
factors.  They are plain functions of their arguments so the optimizer class
only sequences them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..neural_ode import NeuralODE
from .kfac import SUPPORTED_LAYERS, Factors

__all__ = ["assign_layers", "validate", "find_layers", "base_delta", "reduce_new", "invert_all"]


def _check(ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"Invalid {what}: {value!r}")


def validate(model: Any, *, base: str, lr: float | None, momentum: float, betas: tuple[float, float],
             eps: float, damping: float, factor_decay: float, update_freq: int, inv_freq: int,
             inverse: str, kl_clip: float | None, weight_decay: float, reduction: str) -> float:
    """Check SNOpt's hyperparameters and return the learning rate (the base's default if None).

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    ValueError
        Any invalid hyperparameter, named in the message.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"SNOpt needs the model (an nn.Module), got {type(model).__name__}")
    if base not in ("sgd", "adam"):
        raise ValueError(f"Invalid base optimizer {base!r}; use 'sgd' or 'adam'")
    if lr is None:
        lr = 0.5 if base == "sgd" else 1e-3
    _check(lr > 0 and math.isfinite(lr), "learning rate", lr)
    _check(0 <= momentum < 1, "momentum", momentum)
    _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas", betas)
    _check(eps > 0, "eps", eps)
    _check(damping > 0 and math.isfinite(damping), "damping", damping)
    _check(0 <= factor_decay < 1, "factor_decay", factor_decay)
    _check(isinstance(update_freq, int) and update_freq >= 1, "update_freq", update_freq)
    _check(isinstance(inv_freq, int) and inv_freq >= 1, "inv_freq", inv_freq)
    if inverse not in ("eig", "cholesky"):
        raise ValueError(f"Invalid inverse {inverse!r}; use 'eig' or 'cholesky'")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid reduction {reduction!r}; use 'mean' (local-mean losses, "
                         "gradients averaged) or 'sum' (the engine's comm= decomposition)")
    _check(kl_clip is None or kl_clip > 0, "kl_clip", kl_clip)
    _check(weight_decay >= 0, "weight_decay", weight_decay)
    return lr


def find_layers(model: nn.Module, ode_funcs: Iterable[nn.Module] | None
                ) -> tuple[list[nn.Parameter], list[nn.Module], list[nn.Module], list[nn.Module]]:
    """The trainable parameters, the ODE functions, and the layers inside and outside them.

    Returns
    -------
    params : list of nn.Parameter
        Trainable parameters of ``model`` except those of ``IntegrationTime`` submodules.
    funcs : list of nn.Module
        The ODE right-hand sides (``ode_funcs``, or every ``NeuralODE.func`` in ``model``).
    inner, outer : list of nn.Module
        Supported layers with trainable weights inside the ODE functions, and the
        remaining supported layers of ``model`` whose weight is trained.

    Raises
    ------
    ValueError
        No trainable parameter, or no supported layer inside any ODE function.
    """
    from .time_control import IntegrationTime  # a sibling; no import cycle at module level

    skip = {id(p) for m in model.modules() if isinstance(m, IntegrationTime) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    if not params:
        raise ValueError("Invalid model: it has no trainable parameters")
    funcs = list(ode_funcs) if ode_funcs is not None else [
        m.func for m in model.modules() if isinstance(m, NeuralODE) and isinstance(m.func, nn.Module)]
    inner: list[nn.Module] = []
    for f in funcs:
        if not isinstance(f, nn.Module):
            raise TypeError(f"ode_funcs must be nn.Modules, got {type(f).__name__}")
        inner += [m for m in f.modules() if isinstance(m, SUPPORTED_LAYERS) and m.weight.requires_grad]
    if not inner:
        raise ValueError(
            "Invalid model: no nn.Linear or nn.Conv2d with trainable weights inside any ODE function "
            "(pnode.NeuralODE blocks, or ode_funcs=...); SNOpt has nothing to precondition there — "
            "use a first-order optimizer, or pass ode_funcs for models that call pnode.odeint")
    inner_ids = {id(m) for m in inner}
    param_ids = {id(p) for p in params}
    outer = [m for m in model.modules() if isinstance(m, SUPPORTED_LAYERS) and id(m) not in inner_ids
             and id(m.weight) in param_ids]
    return params, funcs, inner, outer


def base_delta(base: str, p: torch.Tensor, d: torch.Tensor, st: dict[str, Any],
               group: dict[str, Any]) -> torch.Tensor:
    """The parameter change of the base rule (SGD with momentum, or Adam) for direction ``d``.

    ``st`` is the parameter's optimizer state; its momentum buffer or Adam
    moments are updated in place.
    """
    lr = group["lr"]
    if base == "sgd":
        if group["momentum"]:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = d.clone()
            else:
                buf.mul_(group["momentum"]).add_(d)
            d = buf
        return d.mul(-lr)
    b1, b2 = group["betas"]
    st["step"] = st.get("step", 0) + 1
    if "exp_avg" not in st:
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
    st["exp_avg"].mul_(b1).add_(d, alpha=1 - b1)
    st["exp_avg_sq"].mul_(b2).addcmul_(d, d, value=1 - b2)
    c1, c2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
    return -lr / c1 * st["exp_avg"] / (st["exp_avg_sq"] / c2).sqrt().add_(group["eps"])


def reduce_new(comm: Any, reduction: str, facs: list[Factors]) -> None:
    """Combine this collection's factors over the ranks of ``comm`` (one Allreduce).

    ``reduction="mean"``: the average over ranks (equal shards, local-mean losses).
    ``reduction="sum"``: weighted by shard size, ``A = sum_r n_r A_r / n`` and
    ``G = n sum_r G_r / n_r``, which are the factors of the whole batch.
    """
    if comm is None or comm.Get_size() == 1:
        return
    from mpi4py import MPI

    weighted = reduction == "sum"
    parts = []
    for f in facs:
        n = float(f.samples_new)
        wa = n if weighted else 1.0
        wg = (1.0 / n if n else 0.0) if weighted else 1.0
        parts.append(torch.cat([f.A_new.reshape(-1) * wa, f.G_new.reshape(-1) * wg,
                                f.A_new.new_tensor([float(f.n_new), n])]).double())
    buf = torch.cat(parts)
    arr = buf.numpy()
    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
    size, i = comm.Get_size(), 0
    for f in facs:
        na, ng = f.A_new.numel(), f.G_new.numel()
        n = float(buf[i + na + ng + 1])
        if weighted:
            sa, sg = (1.0 / n if n else 0.0), n
        else:
            sa = sg = 1.0 / size
        f.A_new.copy_((buf[i:i + na] * sa).view_as(f.A_new))
        f.G_new.copy_((buf[i + na:i + na + ng] * sg).view_as(f.G_new))
        f.n_new = int(buf[i + na + ng])
        f.samples_new = int(n)
        i += na + ng + 2


def invert_all(comm: Any, layers: list[nn.Module], factors: dict[int, Factors],
               group_of: dict[int, dict[str, Any]], names: dict[int, str]) -> None:
    """Invert every layer's factors; under ``comm`` each rank inverts its share and broadcasts."""
    size = 1 if comm is None else comm.Get_size()
    rank = 0 if comm is None else comm.Get_rank()
    facs = [factors[id(m)] for m in layers]
    owners = assign_layers([f.d_in ** 3 + f.d_out ** 3 for f in facs], size)
    for m, fac, owner in zip(layers, facs, owners, strict=True):
        if fac.A is None:
            continue
        group = group_of[id(m.weight)]
        damping, method = group["damping"], group["inverse"]
        if owner == rank:
            fac.invert(damping, method, names.get(id(m), type(m).__name__))
        elif fac.inverse is None or set(fac.inverse) != _inverse_keys(method):
            fac.inverse = _empty_inverse(fac, method)
        if size > 1:
            for t in fac.inverse.values():
                comm.Bcast(t.numpy(), root=owner)


def assign_layers(costs: list[float], size: int) -> list[int]:
    """Rank that inverts each layer: largest first, to the least loaded rank (deterministic)."""
    load = [0.0] * size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def _inverse_keys(method: str) -> set[str]:
    return {"QA", "QG", "scale"} if method == "eig" else {"A_inv", "G_inv"}


def _empty_inverse(fac: Factors, method: str) -> dict[str, torch.Tensor]:
    z = torch.zeros
    if method == "eig":
        return {"QA": z(fac.d_in, fac.d_in, dtype=fac.dtype), "QG": z(fac.d_out, fac.d_out, dtype=fac.dtype),
                "scale": z(fac.d_out, fac.d_in, dtype=fac.dtype)}
    return {"A_inv": z(fac.d_in, fac.d_in, dtype=fac.dtype),
            "G_inv": z(fac.d_out, fac.d_out, dtype=fac.dtype)}
