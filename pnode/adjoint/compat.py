"""torchdiffeq's keywords and options, translated to what a PETSc discrete adjoint does.

Each torchdiffeq option either maps onto PETSc (TSAdapt step limits, safety and
clipping factors, SNES iteration limits, forced step-end times), or is refused
with a ``ValueError`` that says why and what to use instead, or, where it
cannot change the result of an exact discrete adjoint, is accepted with a
one-time warning.  docs/migration_torchdiffeq.rst is the table of all of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .methods import Method, resolve_method
from .timegrid import _as_times

__all__ = ["Translated", "translate_options", "tolerance", "check_adjoint_keywords",
           "warn_once", "TORCHDIFFEQ_OPTIONS"]

# torchdiffeq option names pnode translates here (pnode's own keys pass through)
TORCHDIFFEQ_OPTIONS = {"min_step", "max_step", "jump_t", "step_t", "perturb", "grid_constructor",
                       "safety", "ifactor", "dfactor", "dtype", "norm", "max_iters", "interp"}
_REFUSED = {
    "max_order": "it is an option of the Adams methods, which pnode refuses (no discrete "
                 "adjoint in PETSc); use a Runge-Kutta method such as dopri5",
    "solver": "it is an option of scipy_solver, which pnode refuses (SciPy's integrators have "
              "no discrete adjoint); use dopri5, or an implicit method for stiff problems",
}
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process (a training loop calls odeint often)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


@dataclass
class Translated:
    """Options after translation.

    Attributes
    ----------
    options : dict
        pnode's own option keys (``step_size``, ``first_step``, ...).
    petsc : dict
        PETSc options implied by torchdiffeq ones (the caller's ``petsc_options`` win).
    step_ends : list of float
        Times where a step must end (``jump_t``, ``step_t``), in the solver's time variable.
    grid : callable or None
        ``grid_constructor``; called as torchdiffeq does, ``grid(func, y0, t)``.
    """

    options: dict = field(default_factory=dict)
    petsc: dict = field(default_factory=dict)
    step_ends: list[float] = field(default_factory=list)
    grid: Callable | None = None


def _number(value: Any, name: str, *, low: float, high: float = math.inf,
            low_open: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        raise ValueError(f"options[{name!r}] must be a number {bound}, got {value!r}")
    return float(value)


def tolerance(value: Any, name: str) -> float:
    """``rtol``/``atol`` as a float: a positive number or a one-element tensor."""
    if isinstance(value, (tuple, list)):
        raise ValueError(f"{name} given per part of a tuple state ({value!r}) is not supported: "
                         "PETSc's TSAdapt here takes one scalar tolerance; pass the tightest "
                         "one, or rescale the parts of the state")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (a number or a one-element tensor), got a "
                             f"tensor of shape {tuple(value.shape)}; per-component tolerances "
                             "are not supported, rescale the state instead")
        value = float(value.detach())
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _adaptive_only(name: str, adaptive: bool) -> bool:
    if not adaptive:
        warn_once(f"fixed:{name}", f"options[{name!r}] has no effect with a fixed-step method "
                  "(as in torchdiffeq, it only steers adaptive step-size control)")
    return adaptive


def translate_options(options: Mapping[str, Any] | None, method: Method, *,
                      reverse: bool) -> Translated:
    """Split ``options`` into pnode's keys, PETSc options and forced step-end times.

    Raises
    ------
    ValueError
        A torchdiffeq option with a bad value, or one pnode refuses (with the reason).
    """
    out = Translated()
    if options is None:
        return out
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict, got {type(options).__name__}")
    adaptive = method.adaptive and options.get("step_size") is None
    for key, value in options.items():
        if key in _REFUSED:
            raise ValueError(f"options[{key!r}] is not supported: {_REFUSED[key]}")
        if key not in TORCHDIFFEQ_OPTIONS:
            out.options[key] = value
        elif value is not None:
            _translate_one(out, key, value, method, adaptive)
    if reverse:  # step-end times are given in t; the solver runs in s = -t
        out.step_ends = [-x for x in out.step_ends]
    if out.grid is not None and out.options.get("step_size") is not None:
        raise ValueError("options 'step_size' and 'grid_constructor' are mutually exclusive "
                         "(as in torchdiffeq): pass one of them")
    _clip(out, options)
    return out


def _clip(out: Translated, options: Mapping[str, Any]) -> None:
    d, i = options.get("dfactor"), options.get("ifactor")
    if (d is None and i is None) or "_adaptive" not in out.petsc:
        out.petsc.pop("_adaptive", None)
        return
    out.petsc.pop("_adaptive")
    low = 0.1 if d is None else _number(d, "dfactor", low=0.0, high=1.0, low_open=True)
    high = 10.0 if i is None else _number(i, "ifactor", low=1.0)
    out.petsc["ts_adapt_clip"] = f"{low!r},{high!r}"


def _translate_one(out: Translated, key: str, value: Any, method: Method, adaptive: bool) -> None:
    if key in ("min_step", "max_step"):
        v = _number(value, key, low=0.0, low_open=key == "max_step")
        if _adaptive_only(key, adaptive):
            out.petsc["ts_adapt_dt_min" if key == "min_step" else "ts_adapt_dt_max"] = repr(v)
    elif key == "safety":
        v = _number(value, key, low=0.0, high=1.0, low_open=True)
        if _adaptive_only(key, adaptive):
            out.petsc["ts_adapt_safety"] = repr(v)
    elif key in ("ifactor", "dfactor"):
        if _adaptive_only(key, adaptive):
            out.petsc["_adaptive"] = "1"  # resolved together by _clip
    elif key in ("jump_t", "step_t"):
        out.step_ends.extend(_as_times(value, f"options[{key!r}]"))
        if key == "jump_t":
            warn_once("jump_t", "options['jump_t']: steps end exactly at these times, but func "
                      "is evaluated at the jump time itself on both sides (no one-sided "
                      "perturbation); give func its right-hand value there")
    elif key == "grid_constructor":
        if not callable(value):
            raise ValueError("options['grid_constructor'] must be callable (func, y0, t) -> grid")
        if method.adaptive:
            raise ValueError("options['grid_constructor'] applies to fixed-step methods (euler, "
                             "rk4, ...); with an adaptive method use options['step_t'] or "
                             "options['jump_t'] to make steps end at given times")
        out.grid = value
    elif key == "max_iters":
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"options['max_iters'] must be an int >= 1, got {value!r}")
        if method.implicit or method.imex:
            out.petsc["snes_max_it"] = str(value)
        else:
            warn_once("max_iters", "options['max_iters'] has no effect with an explicit method "
                      "(it limits Newton iterations of implicit methods)")
    else:
        _accepted_without_effect(key, value)


def _accepted_without_effect(key: str, value: Any) -> None:
    if key == "dtype":
        if not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise ValueError(f"options['dtype'] must be a floating torch.dtype, got {value!r}")
        if value != torch.float64:
            warn_once("dtype", f"options['dtype']={value} has no effect: PETSc keeps times in "
                      "float64")
    elif key == "norm":
        raise ValueError(
            "options['norm'] is not supported: PETSc's TSAdapt measures the local error with "
            "its weighted RMS norm over all components (set petsc_options={'ts_adapt_wnormtype': "
            "'infinity'} for a max norm); a custom norm cannot be passed to it")
    elif key == "interp":
        if value not in ("linear", "cubic"):
            raise ValueError(f"options['interp'] must be 'linear' or 'cubic', got {value!r}")
        warn_once("interp", "options['interp'] has no effect: pnode ends a step at every output "
                  "time, so outputs are never interpolated")
    elif key == "perturb":
        if not isinstance(value, bool):
            raise ValueError(f"options['perturb'] must be True or False, got {value!r}")
        if value:
            warn_once("perturb", "options['perturb']=True has no effect: stages are evaluated "
                      "at their exact times; steps end at output times and at options['jump_t']")


def check_adjoint_keywords(*, method: Method, rtol: float, atol: float, adjoint_rtol: Any,
                           adjoint_atol: Any, adjoint_method: Any, adjoint_options: Any) -> None:
    """Validate torchdiffeq's ``adjoint_*`` keywords; warn once where torchdiffeq would differ.

    The gradient is the exact adjoint of the forward scheme: there is no separate
    backward ODE solve, so there is nothing for these to tune.
    """
    why = ("pnode's gradient is the exact discrete adjoint of the forward scheme (no backward "
           "ODE solve to tune)")
    for name, value, fwd in (("adjoint_rtol", adjoint_rtol, rtol), ("adjoint_atol", adjoint_atol, atol)):
        if value is not None and tolerance(value, name) != fwd:
            warn_once(name, f"{name} has no effect: {why}")
    if adjoint_method is not None and resolve_method(adjoint_method) != method:
        warn_once("adjoint_method", f"adjoint_method={adjoint_method!r} has no effect: {why}, "
                  f"so the backward pass always uses {method.name!r}")
    if adjoint_options is None:
        return
    if not isinstance(adjoint_options, Mapping):
        raise ValueError(f"adjoint_options must be a dict, got {type(adjoint_options).__name__}")
    norm = adjoint_options.get("norm")
    if norm is not None and norm != "seminorm" and not callable(norm):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable, got {norm!r}")
    if adjoint_options:
        warn_once("adjoint_options", f"adjoint_options has no effect: {why}; with "
                  "norm='seminorm' torchdiffeq changes its inexact adjoint's steps, pnode's "
                  "gradient is exact either way")
