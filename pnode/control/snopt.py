"""SNOpt: Kronecker-factored second-order training of neural ODEs on the PETSc adjoint.

Liu, Chen & Theodorou, "Second-Order Neural ODE Optimizer", NeurIPS 2021
(arXiv:2109.14158).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..adjoint import VjpEvent, observe_vjps
from . import kfac
from .kfac import Factors
from .snopt_parts import (
    assign_layers,  # noqa: F401  (kept importable from here, where it lived)
    base_delta,
    find_layers,
    invert_all,
    reduce_new,
    validate,
)

__all__ = ["SNOpt"]


class SNOpt(torch.optim.Optimizer):
    r"""Second-order Neural ODE Optimizer (SNOpt) with pnode's discrete adjoint.

    Linear and Conv2d layers inside ODE functions, and those outside ODE blocks,
    are preconditioned with Kronecker factors ``A ⊗ G``; every other parameter
    (norms, embeddings, a learnable scale) gets the base optimizer's plain update.

    **Layers inside an ODE function.**  During the adjoint sweep of
    :func:`pnode.odeint`, an explicit Runge-Kutta scheme's parameter gradient is
    the quadrature ``dW = sum_e w_e g_e a_e^T`` over the stage products ``e`` the
    engine reports (:func:`pnode.adjoint.observe_vjps`), with ``w_e = h b_i`` and
    ``a_e``, ``g_e`` the layer's input and output-gradient matrices at that
    stage.  It is the discrete form of ``dW = ∫ g(t) a(t)^T dt`` (Liu et al. 2021,
    sec. 3).  Following the paper's Kronecker factorisation of the parameter
    Hessian of the ODE block (sec. 3.2, eq. 13-14: time integrals of the
    layer's activation and output-gradient covariances), each factor is the
    same quadrature applied to its covariance:

    .. math::

        A = \sum_e |w_e|\, \overline{a_e a_e^T}, \qquad
        G = \sum_e |w_e|\, B \sum_n g_{e,n} g_{e,n}^T,

    i.e. ``A ≈ ∫ E[a a^T] dt`` and ``G ≈ ∫ E[g g^T] dt``.  Treating the
    trajectory as one weight-tied layer applied at every time (the
    "fully correlated in time" choice), ``A ⊗ G`` has the scale of the gradient's
    outer product: for time-constant statistics it is ``T^2 Ā ⊗ Ḡ`` while the
    gradient is ``T ḡ``, and both factors converge under step refinement, so the
    update does not depend on the step size.  ``|w_e|`` keeps the factors
    positive semi-definite for tableaux with negative weights.  The samples are
    the actual loss's gradients (empirical Fisher), as in the paper.

    **Layers outside ODE blocks.**  Ordinary K-FAC (Martens & Grosse 2015) from
    module hooks on the main forward and backward pass, with the same factor
    conventions (see :mod:`pnode.control.kfac`; the loss is taken to be averaged
    over the batch's first axis).

    **Update.**  Every ``update_freq`` steps the factors of that iteration are
    folded into running averages ``X <- decay X + (1 - decay) X_new``; every
    ``inv_freq`` steps they are inverted (``"eig"``: exact damping
    ``(A ⊗ G + damping I)^{-1}``; ``"cholesky"``: factored damping, see
    :mod:`pnode.control.kfac`).  The preconditioned direction is rescaled so that
    ``lr^2 <d, grad> <= kl_clip`` (base ``"sgd"``) and handed to SGD with
    momentum or to Adam.

    Parameters
    ----------
    model : nn.Module
        The model trained; all its parameters with ``requires_grad`` are updated
        (except those of :class:`pnode.control.IntegrationTime` submodules).
    lr : float, optional
        Learning rate (default 0.5 for ``base="sgd"``, 1e-3 for ``"adam"``).
    base : {"sgd", "adam"}
        First-order rule applied to the preconditioned directions.
    momentum : float, default 0
        SGD momentum (base ``"sgd"``).
    betas, eps : optional
        Adam constants (base ``"adam"``).
    damping : float, default 1e-2
        Tikhonov damping of ``A ⊗ G`` (> 0).
    factor_decay : float, default 0.8
        Running-average decay of the factors, in [0, 1).
    update_freq : int, default 4
        Collect factors every that many steps (collection costs about as much as
        the stage products of the adjoint themselves, so it is amortised).
    inv_freq : int, default 4
        Re-invert the factors every that many steps (a multiple of ``update_freq``
        is sensible).
    inverse : {"eig", "cholesky"}
        Inversion method.
    kl_clip : float or None, default 1e-2
        Trust-region bound on ``lr^2 <d, grad>`` for base ``"sgd"``; None: no rescaling.
    weight_decay : float, default 0
        L2 penalty added to the gradients before preconditioning.
    ode_funcs : iterable of nn.Module, optional
        The right-hand sides of the model's ODE blocks.  By default the ``func``
        of every :class:`pnode.NeuralODE` inside ``model``; pass them for models
        that call :func:`pnode.odeint` themselves.
    comm : mpi4py communicator, optional
        Data decomposition: the factors of each collection are combined over the
        ranks (one ``Allreduce``), each rank inverts a balanced share of the layers
        and broadcasts the result.
    reduction : {"mean", "sum"}, default "mean"
        How the gradients under ``comm`` were formed.  ``"mean"``: each rank's loss
        is the mean over its own (equal-sized) shard and the caller averages the
        gradients over ranks.  ``"sum"``: the engine's data decomposition
        (``pnode.odeint(..., comm=)``, :class:`pnode.parallel.DataParallel`, ``pnode
        run``): each rank's loss is its share of the global mean (sum over the shard
        divided by the global batch size) and gradients are summed over ranks; the
        factors are then combined by shard size, so uneven shards give the serial
        factors too.

    Hyperparameters are read per parameter group (``lr``, ``momentum``, ``betas``,
    ``eps``, ``weight_decay``, ``kl_clip`` for the group's parameters; ``damping``,
    ``factor_decay``, ``inverse`` for the layers whose weight is in the group);
    ``update_freq`` and ``inv_freq`` schedule all layers together and must agree
    across groups.

    Raises
    ------
    ValueError
        An invalid hyperparameter, or no Linear/Conv2d layer inside any ODE function.

    Notes
    -----
    Needs an explicit Runge-Kutta method (``euler``, ``midpoint``, ``rk4``,
    ``bosh3``, ``dopri5``, ...): implicit and IMEX adjoints do not expose quadrature
    weights, and a backward pass through one raises ``ValueError``.  Steps whose
    gradients hold NaN or Inf raise ``FloatingPointError`` and leave the
    parameters and the optimizer state unchanged.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(64, 32), pnode.NeuralODE(Field(32), method="rk4",
    ...                       options={"step_size": 0.25}), nn.Linear(32, 10))
    >>> opt = pnode.control.SNOpt(model)
    >>> for x, y in loader:
    ...     opt.zero_grad()
    ...     F.cross_entropy(model(x), y).backward()
    ...     opt.step()
    """

    def __init__(self, model: nn.Module, *, lr: float | None = None, base: str = "sgd",
                 momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 damping: float = 1e-2, factor_decay: float = 0.8, update_freq: int = 4,
                 inv_freq: int = 4, inverse: str = "eig", kl_clip: float | None = 1e-2,
                 weight_decay: float = 0.0, ode_funcs: Iterable[nn.Module] | None = None,
                 comm: Any = None, reduction: str = "mean") -> None:
        lr = validate(model, base=base, lr=lr, momentum=momentum, betas=betas, eps=eps, damping=damping,
                      factor_decay=factor_decay, update_freq=update_freq, inv_freq=inv_freq,
                      inverse=inverse, kl_clip=kl_clip, weight_decay=weight_decay, reduction=reduction)
        params, funcs, inner, outer = find_layers(model, ode_funcs)
        defaults = dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps, damping=damping,
                        factor_decay=factor_decay, update_freq=update_freq, inv_freq=inv_freq,
                        inverse=inverse, kl_clip=kl_clip, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.base = base
        self.comm = comm
        self.reduction = reduction
        self.layers: list[nn.Module] = inner + outer
        self.ode_layers = frozenset(id(m) for m in inner)
        self._ode_funcs = frozenset(id(f) for f in funcs)
        self.factors: dict[int, Factors] = {}
        for m in self.layers:
            d_in = m.weight[0].numel() + (1 if m.bias is not None else 0)
            self.factors[id(m)] = Factors(d_in, m.weight.shape[0], m.weight.dtype)
        self._names = {id(m): n for n, m in model.named_modules()}
        self._pending: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.steps = 0
        self.collecting = True
        self.last_directional_derivative = 0.0  # <grad, delta theta> of the last step

        # 3. hooks (the optimizer is referenced weakly: hooks do not keep it alive)
        ref = weakref.ref(self)
        self._handles = [m.register_forward_hook(_forward_hook(ref)) for m in self.layers]
        self._handles.append(observe_vjps(_event_hook(ref)))
        weakref.finalize(self, _remove_all, list(self._handles))

    # -- hooks ------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not (self.collecting and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad and inputs and isinstance(inputs[0], torch.Tensor)):
            return
        x = inputs[0].detach()
        if id(module) in self.ode_layers:
            def hook(g, m=module, x=x):
                self._pending.append((m, x, g))
        else:
            def hook(g, m=module, x=x):
                self.factors[id(m)].add(m, x, g, 1.0)
        try:
            output.register_hook(hook)
        except RuntimeError:  # e.g. inside a torch.func transform: nothing to collect there
            pass

    def _on_event(self, ev: VjpEvent) -> None:
        if ev.weight is None and self.collecting and (self._pending or id(ev.func) in self._ode_funcs):
            self._pending = []
            raise ValueError(
                "Invalid method for SNOpt: the adjoint of an implicit or IMEX method has no quadrature "
                "weights to integrate the Kronecker factors with; use an explicit Runge-Kutta method "
                "(euler, midpoint, rk4, bosh3, dopri5, ...)")
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        w = abs(float(ev.weight))
        for m, x, g in pending:
            self.factors[id(m)].add(m, x, g, w)

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model and the engine (it can no longer collect factors)."""
        _remove_all(self._handles)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["snopt"] = {"steps": self.steps, "collecting": self.collecting, "base": self.base,
                       "last_directional_derivative": self.last_directional_derivative}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("snopt", None)
        super().load_state_dict(state_dict)
        if extra is not None and extra.get("base", self.base) not in ("sgd", "adam"):
            raise ValueError(f"Invalid state_dict: base optimizer {extra['base']!r}")
        if extra is not None:
            # the base rule owns the per-parameter state (momentum or Adam moments) just loaded
            self.base = extra.get("base", self.base)
            self.steps = int(extra["steps"])
            self.collecting = bool(extra["collecting"])
            self.last_directional_derivative = float(extra["last_directional_derivative"])
        for m in self.layers:  # factors and inverses live in the state of each layer's weight
            fac, st = self.factors[id(m)], self.state.get(m.weight, {})
            fac.A, fac.G = st.get("kfac_A"), st.get("kfac_G")
            inv = {k[4:]: v for k, v in st.items() if k.startswith("inv_")}
            fac.inverse = inv or None
            fac.clear_new()

    def _save_factors(self, m: nn.Module) -> None:
        fac, st = self.factors[id(m)], self.state[m.weight]
        for k in [k for k in st if k.startswith("inv_")]:
            del st[k]
        if fac.A is not None:
            st["kfac_A"], st["kfac_G"] = fac.A, fac.G
        if fac.inverse is not None:
            st.update({"inv_" + k: v for k, v in fac.inverse.items()})

    # -- the step -----------------------------------------------------------------------
    def _group_of(self) -> dict[int, dict[str, Any]]:
        """Parameter id -> its param group; the schedules must agree across groups."""
        groups = self.param_groups
        for key in ("update_freq", "inv_freq"):
            values = {g[key] for g in groups}
            if len(values) > 1:
                raise ValueError(f"Invalid param_groups: {key} differs between groups "
                                 f"({sorted(values)}); SNOpt collects and inverts all layers together")
        return {id(p): g for g in groups for p in g["params"]}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update; ``closure`` re-evaluates the model and returns the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of = self._group_of()
        sched = self.param_groups[0]  # update_freq / inv_freq: equal in every group
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        # 1. refuse a non-finite step before touching anything
        for p in params:
            if not bool(torch.isfinite(p.grad).all()):
                self._pending.clear()
                for fac in self.factors.values():
                    fac.clear_new()
                raise FloatingPointError(
                    "SNOpt: a gradient holds NaN or Inf (shape " f"{tuple(p.shape)}); the step was not "
                    "taken (lower the learning rate, or check the loss)")
        for fac in self.factors.values():
            for x in (fac.A_new, fac.G_new):
                if not bool(torch.isfinite(x).all()):
                    fac.clear_new()
                    raise FloatingPointError("SNOpt: collected Kronecker factors hold NaN or Inf; the "
                                             "step was not taken")

        # 2. factors: fold this step's collection, re-invert on schedule
        self._pending.clear()
        first = any(f.A is None and f.n_new for f in self.factors.values())
        if self.collecting:
            self._reduce_new()
            for m in self.layers:
                self.factors[id(m)].fold(group_of[id(m.weight)]["factor_decay"])
        if first or self.steps % sched["inv_freq"] == 0:
            self._invert(group_of)
        for m in self.layers:
            self._save_factors(m)

        # 3. directions: preconditioned for the layers, plain for the rest
        direction = {}
        for p in params:
            wd = group_of[id(p)]["weight_decay"]
            direction[p] = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
        dots: dict[int, float] = {}  # <preconditioned, grad> per group, for its kl_clip
        for m in self.layers:
            gm = kfac.weight_matrix_grad(m)
            if gm is None or m.weight not in direction:
                continue
            group = group_of[id(m.weight)]
            wd = group["weight_decay"]
            if wd:
                gm = gm + wd * torch.cat([m.weight.reshape(m.weight.shape[0], -1)]
                                         + ([m.bias.reshape(-1, 1)] if m.bias is not None else []), dim=1)
            pre = self.factors[id(m)].precondition(gm)
            dots[id(group)] = dots.get(id(group), 0.0) + float((pre * gm).sum())
            for p, d in zip([m.weight] + ([m.bias] if m.bias is not None else []),
                            kfac.split_matrix(m, pre), strict=True):
                direction[p] = d
        if self.base == "sgd":
            for group in self.param_groups:
                dot, lr = dots.get(id(group), 0.0), group["lr"]
                if group["kl_clip"] is not None and dot > 0:
                    nu = min(1.0, math.sqrt(group["kl_clip"] / (lr * lr * dot)))
                    for p in group["params"]:
                        if p in direction:
                            direction[p].mul_(nu)

        # 4. base rule, with each parameter's own group
        directional = 0.0
        for p, d in direction.items():
            st, group = self.state[p], group_of[id(p)]
            delta = base_delta(self.base, p, d, st, group)
            directional += float((p.grad * delta).sum())
            p.add_(delta)
        self.last_directional_derivative = directional
        self.steps += 1
        self.collecting = self.steps % sched["update_freq"] == 0
        return loss

    def _reduce_new(self) -> None:
        """Combine this collection's factors over the ranks of ``comm`` (see :func:`reduce_new`)."""
        reduce_new(self.comm, self.reduction, [self.factors[id(m)] for m in self.layers])

    def _invert(self, group_of: dict[int, dict[str, Any]]) -> None:
        """Invert every layer's factors; under ``comm`` each rank inverts its share and broadcasts."""
        invert_all(self.comm, self.layers, self.factors, group_of, self._names)


def _forward_hook(ref):
    def hook(module, inputs, output):
        opt = ref()
        if opt is not None:
            opt._on_forward(module, inputs, output)
    return hook


def _event_hook(ref):
    def hook(ev):
        opt = ref()
        if opt is not None:
            opt._on_event(ev)
    return hook


def _remove_all(handles: list) -> None:
    for h in handles:
        h.remove()
