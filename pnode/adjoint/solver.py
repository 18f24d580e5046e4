"""TS lifecycle: one PETSc TS per (func, state, method, options), forward and adjoint sweeps.

A :class:`TSSolver` owns its PETSc objects (TS, Vecs, Mats) and destroys them
explicitly.  Forward solves run segment by segment between consecutive output
times with ``MATCHSTEP``, so every output time is a step boundary (no
tolerance-based matching) and the number of steps of each segment is known.
The adjoint runs the segments backwards with ``TSAdjointSetSteps`` and adds the
incoming gradient of each output at its time.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time as _time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from petsc4py import PETSc

from ..errors import CheckpointError, SolverError
from .checkpoint import Checkpoint
from .distributed import Distributed
from .methods import Method
from .observers import stage_weights
from .problem import TorchProblem, vec_view

__all__ = ["SolveOptions", "SolveStats", "TSSolver", "StateStore", "reason_name"]

# Systems up to this size get an assembled dense Jacobian and a direct (LU) solve
# (measured in benchmarks/engine.py: dense wins up to ~256 unknowns, Krylov beyond).
DENSE_JACOBIAN_MAX = 256
_ids = itertools.count()


def reason_name(reason: int, enum=PETSc.TS.ConvergedReason) -> str:
    """Readable name of a PETSc ``TSConvergedReason`` value."""
    for k in dir(enum):
        if not k.startswith("_") and getattr(enum, k) == reason:
            return k
    return str(reason)


@dataclass(frozen=True)
class SolveOptions:
    """Validated solver options (built by :func:`pnode.odeint`)."""

    rtol: float = 1e-7
    atol: float = 1e-9
    step_size: float | None = None
    first_step: float | None = None
    max_num_steps: int = 1_000_000
    checkpoint: Checkpoint = Checkpoint("stages")
    jacobian: str = "auto"  # "auto" | "dense" | "matfree"
    theta: float | None = None
    endpoint: bool | None = None
    ksp_rtol: float = 1e-12
    snes_rtol: float = 1e-10
    jacobian_lag: int = 100
    petsc_options: tuple[tuple[str, str], ...] = ()
    options_prefix: str = "pnode_"


@dataclass
class SolveStats:
    """Statistics of the last forward (and adjoint) solve.

    Attributes
    ----------
    method : str
        Method name.
    steps : int
        Accepted steps.
    rejected : int
        Rejected steps (adaptive methods).
    step_times : list of float
        All step boundaries ``t_0 < ... < t_M``; replaying them with
        :func:`pnode.adjoint.reference.odeint_reference` reproduces the scheme.
    output_steps : list of int
        Index into ``step_times`` of each output time.
    rhs_evals, jvps, vjps, jacobians : int
        Right-hand side evaluations, Jacobian-vector products, vector-Jacobian
        products and dense Jacobian assemblies.
    newton_iters, ksp_iters : int
        Nonlinear and linear iterations of the forward solve.
    forward_seconds, adjoint_seconds : float
        Wall time of the sweeps.
    recomputed_steps : int
        Steps re-integrated by the adjoint sweep (binomial and disk checkpointing).
    graph_hits : int
        Adjoint stage linearisations served by a forward graph (``"graph"`` policy).
    max_stored_states : int
        Largest number of states held at once by a binomial or disk schedule (RAM and disk).
    disk_writes : int
        States written to disk (disk checkpointing).
    """

    method: str
    steps: int = 0
    rejected: int = 0
    step_times: list[float] = field(default_factory=list)
    output_steps: list[int] = field(default_factory=list)
    rhs_evals: int = 0
    jvps: int = 0
    vjps: int = 0
    jacobians: int = 0
    newton_iters: int = 0
    ksp_iters: int = 0
    forward_seconds: float = 0.0
    adjoint_seconds: float = 0.0
    recomputed_steps: int = 0
    graph_hits: int = 0
    max_stored_states: int = 0
    disk_writes: int = 0


class TSSolver:
    """One PETSc TS bound to a :class:`TorchProblem`.

    Parameters
    ----------
    problem : TorchProblem
        The callbacks.
    method : Method
        The scheme.
    opts : SolveOptions
        Tolerances, step control, checkpointing and PETSc options.
    dist : Distributed, optional
        The communicator of a data-parallel solve (``None``: serial, ``COMM_SELF``).
    """

    def __init__(self, problem: TorchProblem, method: Method, opts: SolveOptions,
                 dist: Distributed | None = None) -> None:
        self.problem = problem
        self.method = method
        self.opts = opts
        self.dist = dist
        self.comm = dist.petsc if dist is not None else PETSc.COMM_SELF
        problem.collective = dist is not None
        self.fixed = opts.step_size is not None or not method.adaptive
        self.busy = False  # a forward trajectory waits for its adjoint
        self.broken = False  # a PETSc error left the objects unusable: rebuild
        self.pool: list | None = None  # the cache list holding this solver
        self.seq: int | None = None  # creation number of a collective solver (odeint._graveyard)
        self._objs: list = []
        self.step_hooks: list = []  # called as hook(t, u) after each accepted step
        self._steps: list[tuple[int, float]] = []
        self.stats = SolveStats(method.name)
        n, n_p = problem.n, problem.n_params
        self.n, self.n_params = n, n_p

        ts = self.ts = PETSc.TS().create(comm=self.comm)
        self._objs.append(ts)
        ts.setOptionsPrefix(opts.options_prefix)
        ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
        ts.setType(method.ts_type)
        try:
            method.register()  # a tableau pnode adds reaches PETSc before first use
            if method.ts_type == "rk":
                ts.setRKType(method.subtype)
            elif method.ts_type == "arkimex":
                ts.setARKIMEXType(method.subtype)
        except PETSc.Error:
            ts.destroy()
            raise ValueError(f"PETSc has no {method.ts_type.upper()} tableau named "
                             f"{method.subtype!r} (method {method.name!r})") from None
        if method.ts_type == "rk":
            problem.stage_weight = stage_weights(method.tableau)  # from the method registry
        if method.ts_type == "theta":
            ts.setTheta(opts.theta if opts.theta is not None else method.theta)
            ts.setThetaEndpoint(opts.endpoint if opts.endpoint is not None else method.endpoint)

        self.x = self._vec(n)
        self.lam = self._vec(n)
        self.mu = self._vec(max(n_p, 1))
        if problem.explicit is not None:
            self.f_rhs = self._vec(n)
            self.J_rhs = self._shell(n, n, "rhs_x")
            ts.setRHSFunction(problem.rhs_function, self.f_rhs)
            ts.setRHSJacobian(problem.rhs_jacobian, self.J_rhs, self.J_rhs)
            if n_p:
                self.Jp_rhs = self._shell(n, n_p, "rhs_p")
                ts.setRHSJacobianP(problem.rhs_jacobian_p, self.Jp_rhs)
        elif method.ts_type == "arkimex":
            # Fully implicit ARK as an additive scheme with a zero explicit part.  Without
            # an RHS function PETSc runs its DIRK path, which starts each solve from a slope
            # evaluated at a stale stage time (wrong for time-dependent func); with G = 0
            # the first explicit stage is f(t_n, y_n) exactly, the scheme is unchanged, and
            # the adjoint (which assumes that stage) is exact.
            self.f_rhs = self._vec(n)
            self.J_rhs = self._shell(n, n, "zero")
            ts.setRHSFunction(problem.zero_rhs, self.f_rhs)
            ts.setRHSJacobian(problem.noop_jacobian, self.J_rhs, self.J_rhs)
        if problem.implicit is not None:
            self.f_imp = self._vec(n)
            ts.setIFunction(problem.ifunction, self.f_imp)
            if problem.dense:
                self.J_imp = PETSc.Mat().createDense((n, n), comm=self.comm)
                self.J_imp.setUp()
                self._objs.append(self.J_imp)
            elif problem.jacobian == "blocks":
                self.J_imp = PETSc.Mat().createBAIJ((n, n), problem.block, nnz=1, comm=self.comm)
                self.J_imp.setUp()
                self._objs.append(self.J_imp)
            else:
                self.J_imp = self._shell(n, n, "ijac_x")
            ts.setIJacobian(problem.ijacobian, self.J_imp, self.J_imp)
            if n_p:
                self.Jp_imp = self._shell(n, n_p, "ijac_p")
                ts.setIJacobianP(problem.ijacobian_p, self.Jp_imp)
        ts.setCostGradients(self.lam, self.mu if n_p else None)
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setMaxSteps(opts.max_num_steps)
        ts.setErrorIfStepFails(False)
        ts.setMaxStepRejections(-1 if not self.fixed else 0)
        ts.setMaxSNESFailures(-1 if not self.fixed else 1)
        ts.setMonitor(self._monitor)
        if not self.fixed:
            ts.setTolerances(rtol=opts.rtol, atol=opts.atol)
        self._configure()

    # -- construction helpers -----------------------------------------------------------
    def _vec(self, n: int) -> PETSc.Vec:
        v = PETSc.Vec().createSeq(n, comm=self.comm) if self.comm.size == 1 else \
            PETSc.Vec().createMPI((n, PETSc.DECIDE), comm=self.comm)
        self._objs.append(v)
        return v

    def _shell(self, m: int, n: int, kind: str) -> PETSc.Mat:
        # local sizes given, global ones summed over the communicator's ranks
        mat = PETSc.Mat().createPython(((m, None), (n, None)), context=self.problem.shell(kind),
                                       comm=self.comm)
        mat.setUp()
        self._objs.append(mat)
        return mat

    def _defaults(self) -> dict[str, str]:
        """pnode's default PETSc options for this solver (the command line overrides them)."""
        d = {
            "ts_trajectory_type": "memory",
            # TSHistory re-sorts all step times on every step (quadratic in the step count);
            # the adjoint does not use it.
            "ts_trajectory_use_history": "0",
            "ts_trajectory_solution_only": "1" if self.opts.checkpoint.kind == "solution" else "0",
            "ts_adapt_type": "none" if self.fixed else "basic",
        }
        if self.problem.implicit is not None:
            # Forward Newton re-uses the Jacobian within one stage solve (modified Newton);
            # the adjoint needs the exact Jacobian at every stage and forces a lag of 1.
            d.update({"snes_rtol": repr(self.opts.snes_rtol), "snes_atol": "1e-14",
                      "snes_max_it": "50", "snes_lag_jacobian": str(self.opts.jacobian_lag)})
            if self.problem.dense:
                d.update({"ksp_type": "preonly", "pc_type": "lu"})
            elif self.problem.jacobian == "blocks":
                # block diagonal: LU in the natural ordering has no fill
                d.update({"ksp_type": "preonly", "pc_type": "lu",
                          "pc_factor_mat_ordering_type": "natural"})
            else:
                # Tight tolerances: the transposed adjoint solves reuse this KSP, and the
                # default rtol 1e-5 would make gradients merely "close".
                d.update({"ksp_type": "gmres", "pc_type": "none",
                          "ksp_rtol": repr(self.opts.ksp_rtol), "ksp_atol": "1e-50",
                          "ksp_gmres_restart": "100", "ksp_max_it": "10000"})
        d.update(dict(self.opts.petsc_options))
        return d

    @contextmanager
    def _options(self, force: dict[str, str] | None = None) -> Iterator[None]:
        """Insert this solver's options around a set-up; command-line values win.

        ``force`` holds values that must apply whatever the command line says (they
        are restored afterwards).
        """
        db = PETSc.Options()
        pre = self.opts.options_prefix
        saved = {}
        for k, v in (force or {}).items():
            saved[pre + k] = db.getString(pre + k) if db.hasName(pre + k) else None
            db.setValue(pre + k, v)
        added = []
        for k, v in self._defaults().items():
            # TSTrajectory reads its options without the TS prefix (petsc4py cannot set one).
            name = k if k.startswith("ts_trajectory_") else pre + k
            if not db.hasName(name):
                db.setValue(name, v)
                added.append(name)
        try:
            yield
        finally:
            for name in added:
                db.delValue(name)
            for name, v in saved.items():
                if v is None:
                    db.delValue(name)
                else:
                    db.setValue(name, v)

    def _configure(self, force: dict[str, str] | None = None) -> None:
        with self._options(force):
            self.ts.setFromOptions()
        self._adjoint_mode = False

    def _set_adjoint_mode(self, on: bool) -> None:
        """Switch SNES Jacobian lagging off for the adjoint sweep, and back.

        TSAdjoint computes stage Jacobians through SNESComputeJacobian, which honours
        ``snes_lag_jacobian``: a lagged (stale) Jacobian there would make the gradient
        wrong, so the adjoint always runs with lag 1, whatever the options say.
        """
        if self.problem.implicit is None or on == self._adjoint_mode:
            return
        snes = self.ts.getSNES()
        if on:
            db, pre = PETSc.Options(), self.opts.options_prefix
            saved = {k: db.getString(pre + k) if db.hasName(pre + k) else None
                     for k in ("snes_lag_jacobian", "snes_lag_preconditioner")}
            for k in saved:
                db.setValue(pre + k, "1")
            try:
                snes.setFromOptions()
            finally:
                for k, v in saved.items():
                    if v is None:
                        db.delValue(pre + k)
                    else:
                        db.setValue(pre + k, v)
        else:
            with self._options():
                snes.setFromOptions()
        self._adjoint_mode = on

    def destroy(self) -> None:
        """Destroy the PETSc objects (one owner, explicit destruction)."""
        for obj in reversed(self._objs):
            obj.destroy()
        self._objs.clear()

    # -- forward --------------------------------------------------------------------------
    def _to_next_output(self, ts) -> None:
        k = len(self._steps)  # steps taken so far, +1 (the monitor has not seen this one yet)
        if k < len(self._grid) - 1:
            ts.setTimeStep(self._grid[k + 1] - self._grid[k])

    def _monitor(self, ts, step, t, u) -> None:
        if step > self._steps[-1][0]:
            self._steps.append((step, t))
            for hook in self.step_hooks:  # event search, torchdiffeq-style callbacks
                hook(t, u)

    def _sync(self, phase: str, t_target: float, petsc_error: Exception | None = None) -> None:
        """Collective solves: raise on every rank if a callback failed on any rank.

        The failing rank raises its own exception (through :meth:`_fail`); the
        others raise a :class:`SolverError` quoting it.  Serial solves: no-op.
        (A NaN returned by the failing rank may also make a collective PETSc
        operation fail on every rank: ``petsc_error``.)
        """
        if self.dist is None:
            return
        prob = self.problem
        bad = self.dist.failures(prob.error, prob.error_t)
        if not bad:
            return
        if prob.error is not None:
            self._fail(phase, t_target, petsc_error)
        self.busy = False
        if petsc_error is not None:
            self.broken = True
        else:
            self._configure()
        rank, msg, t_fail = bad[0]
        raise SolverError(f"{phase} solve stopped: rank {rank} failed with {msg}", t=t_fail,
                          reason="RANK_FAILED", steps=self.ts.getStepNumber(), phase=phase)

    def _fail(self, phase: str, t_target: float, petsc_error: Exception | None = None) -> None:
        """Turn a failed PETSc solve into the right Python exception.

        An error raised inside a PETSc call can leave its objects half-way (e.g.
        vectors still locked), so the solver is marked broken: its pool destroys
        it and the next call builds a fresh one.
        """
        prob = self.problem
        err, err_t = prob.error, prob.error_t
        prob.reset_error()
        self.busy = False
        if petsc_error is not None:
            self.broken = True
        else:
            self._configure()  # drop the partial trajectory; the solver stays usable
        steps = self.ts.getStepNumber()
        if isinstance(err, FloatingPointError):
            raise SolverError(
                f"{phase} solve produced NaN/Inf: {err}", t=err_t, reason="DIVERGED_NONFINITE",
                steps=steps, phase=phase,
            ) from None
        if err is not None:
            raise err
        reason = self.ts.getConvergedReason()
        t_now = self.ts.getTime()
        if petsc_error is not None and reason >= 0:
            raise SolverError(f"{phase} solve stopped by a PETSc error: {petsc_error}", t=t_now,
                              reason="PETSC_ERROR", steps=steps, phase=phase) from None
        if reason >= 0:
            msg = (f"stopped before reaching t={t_target:.6g}: max_num_steps="
                   f"{self.opts.max_num_steps} reached; raise options['max_num_steps'] or loosen "
                   "rtol/atol")
            name = "MAX_STEPS" if reason == PETSc.TS.ConvergedReason.CONVERGED_ITS else \
                reason_name(reason)
        else:
            name = reason_name(reason)
            hints = {
                "DIVERGED_NONLINEAR_SOLVE": "Newton failed; try smaller steps, an implicit "
                "method with adaptivity, or snes_* options",
                "DIVERGED_STEP_REJECTED": "step size underflow: the problem may be stiff (try an "
                "implicit method) or blow up",
            }
            msg = f"{phase} solve failed: {hints.get(name, 'PETSc reported divergence')}"
        raise SolverError(msg, t=t_now, reason=name, steps=steps, phase=phase)

    def forward(self, y0: torch.Tensor, t: torch.Tensor, *, record: bool) -> torch.Tensor:
        """Integrate from ``t[0]`` through every output time.

        Parameters
        ----------
        y0 : Tensor
            Flat float64 initial state.
        t : Tensor
            Output times (float64, strictly increasing).
        record : bool
            Keep the trajectory for a following :meth:`adjoint`.

        Returns
        -------
        Tensor
            ``[len(t), n]`` float64 solutions.
        """
        ts, prob = self.ts, self.problem
        # A fresh trajectory per forward solve: PETSc's memory trajectory is not built to be
        # replayed twice (reusing it after an adjoint sweep can read freed stack entries).
        # Without a following adjoint no trajectory is kept at all.
        policy = self.opts.checkpoint
        ts.removeTrajectory()
        if record and not policy.replays:
            ts.setSaveTrajectory()
        self._configure()
        prob.reset_error()
        prob.forget_points()
        self._y0 = y0.clone() if policy.replays else None
        prob.keep_graphs(record and policy.kind == "graph", policy.memory_mib)
        c0 = (prob.counters.rhs, prob.counters.jvp, prob.counters.vjp, prob.counters.jacobians)
        start = _time.perf_counter()
        tt = t.tolist()
        vec_view(self.x, "w").copy_(y0)
        ts.setTime(tt[0])
        ts.setStepNumber(0)
        ts.setMaxTime(tt[-1])
        # One TSSolve through all output times: TSAdapt shortens the step that would pass an
        # evaluation time so that a step ends there (the memory trajectory needs one
        # uninterrupted solve; a solve that ends early would not record its last step).
        ts.setEvaluationTimes(tt)
        self._eval_times = tt
        self._steps = [(0, tt[0])]
        if self.fixed:
            h = self.opts.step_size
            ts.setTimeStep(h if h is not None else tt[1] - tt[0])
            if h is None:  # one step per output interval, as torchdiffeq's fixed-grid solvers
                self._grid = tt
                ts.setPostStep(self._to_next_output)
        else:
            h0 = self.opts.first_step or self._initial_step(tt[0], y0, tt[-1] - tt[0])
            # TSAdapt clamps the steps it chooses, not the first one: options['max_step']
            dt_max = float(dict(self.opts.petsc_options).get("ts_adapt_dt_max", "inf"))
            ts.setTimeStep(min(h0, tt[1] - tt[0], dt_max))
        try:
            ts.solve(self.x)
        except PETSc.Error as exc:
            self._sync("forward", tt[-1], exc)
            self._fail("forward", tt[-1], exc)
        self._sync("forward", tt[-1])
        if prob.error is not None or ts.getConvergedReason() < 0:
            self._fail("forward", tt[-1])
        sol_times, sol_vecs = ts.getEvaluationSolutions()
        if len(sol_times) != len(tt):
            self._fail("forward", tt[len(sol_times)] if len(sol_times) < len(tt) else tt[-1])
        ys = torch.stack([vec_view(v) for v in sol_vecs]).clone()
        # Step index of each output: the monitor saw the same ts->ptime values PETSc stored.
        step_of = {time: step for step, time in self._steps}
        self.seg_steps = [step_of[float(s)] for s in sol_times]
        if self.seg_steps[0] != 0 or self.seg_steps[-1] != ts.getStepNumber():
            raise AssertionError("internal: evaluation times do not match step boundaries")
        newton, ksp, rejected = ts.getSNESIterations(), ts.getKSPIterations(), ts.getStepRejections()
        st = self.stats = SolveStats(self.method.name)
        st.steps = self.seg_steps[-1]
        st.step_times = [time for _, time in self._steps]
        st.output_steps = list(self.seg_steps)
        st.rejected = rejected
        st.newton_iters, st.ksp_iters = newton, ksp
        st.rhs_evals = prob.counters.rhs - c0[0]
        st.jvps = prob.counters.jvp - c0[1]
        st.jacobians = prob.counters.jacobians - c0[3]
        st.forward_seconds = _time.perf_counter() - start
        self.busy = record
        return ys

    def _adjoint_finite(self) -> bool:
        ok = bool(torch.isfinite(vec_view(self.lam)).all())
        ok = ok and (not self.n_params or bool(torch.isfinite(vec_view(self.mu)).all()))
        return ok if self.dist is None else self.dist.all_true(ok)

    def _param_gradient(self) -> torch.Tensor:
        """The parameter gradient: this rank's block, summed over ranks (one allreduce)."""
        if not self.n_params:
            return torch.zeros(0, dtype=torch.float64)
        mu = vec_view(self.mu).clone()
        return self.dist.sum(mu) if self.dist is not None else mu

    def _initial_step(self, t0: float, y0: torch.Tensor, span: float) -> float:
        """Starting step for adaptive solves (Hairer, Norsett & Wanner, Sec. II.4).

        Uses two right-hand side evaluations; a step too large for a stiff
        transient would otherwise be accepted unchecked by schemes (TSTHETA)
        whose error estimate needs a previous step.
        """
        prob, o = self.problem, self.opts
        part = prob.implicit if prob.explicit is None else prob.explicit

        def f(t, y):
            out = prob._eval(part, t, y).to(torch.float64)
            if prob.explicit is not None and prob.implicit is not None:
                out = out + prob._eval(prob.implicit, t, y).to(torch.float64)
            return out

        dist = self.dist

        def norms(*vs):
            # RMS norms over the whole (possibly distributed) state: one reduction
            sq = torch.stack([((v / scale) ** 2).sum() for v in vs]
                             + [torch.tensor(float(y0.numel()), dtype=torch.float64)])
            sq = dist.sum(sq) if dist is not None else sq.to(torch.float64)
            count = float(sq[-1])
            return [float(torch.sqrt(x / count)) if count else 0.0 for x in sq[:-1]]

        def guarded(t, y):
            # a failure on one rank must not skip the others' reductions
            try:
                return f(t, y)
            except BaseException as exc:
                if dist is None:
                    raise
                if prob.error is None:
                    prob.error, prob.error_t = exc, t
                return torch.full_like(y, float("nan"))

        try:
            with torch.no_grad():
                scale = o.atol + o.rtol * y0.abs()
                f0 = guarded(t0, y0)
                d0, d1 = norms(y0, f0)
                self._sync("forward", t0)
                h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
                h0 = min(h0, span)
                f1 = guarded(t0 + h0, y0 + h0 * f0)
                (d2,) = norms(f1 - f0)
                self._sync("forward", t0)
                d2 /= h0
                order = max(self.method.order, 1)
                if max(d1, d2) <= 1e-15:
                    h1 = max(1e-6, h0 * 1e-3)
                else:
                    h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
                return min(100 * h0, h1, span)
        finally:
            prob.counters.rhs += 2

    # -- adjoint --------------------------------------------------------------------------
    def adjoint(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run TSAdjointSolve backwards through the segments of the last forward solve.

        Parameters
        ----------
        grad_ys : Tensor
            ``[len(t), n]`` float64 gradients of the loss with respect to each output.

        Returns
        -------
        grad_y0 : Tensor
            ``[n]`` gradient with respect to the initial state.
        grad_params : Tensor
            ``[n_params]`` gradient with respect to the parameters.
        """
        if self.opts.checkpoint.replays:
            return self._adjoint_scheduled(grad_ys)
        ts, prob = self.ts, self.problem
        prob.reset_error()
        prob.forget_points()
        self._set_adjoint_mode(True)
        v0, h0 = prob.counters.vjp, prob.counters.graph_hits
        start = _time.perf_counter()
        lam = vec_view(self.lam, "w")
        lam.copy_(grad_ys[-1])
        if self.n_params:
            vec_view(self.mu, "w").zero_()
        try:
            for k in range(len(self.seg_steps) - 1, 0, -1):
                nsteps = self.seg_steps[k] - self.seg_steps[k - 1]
                if nsteps:
                    ts.adjointSetSteps(nsteps)
                    ts.adjointSolve()
                    reason = ts.getConvergedReason()
                    self._sync("adjoint", self.stats.step_times[self.seg_steps[k - 1]])
                    if prob.error is not None or reason < 0:
                        self._fail("adjoint", self.stats.step_times[self.seg_steps[k - 1]])
                    if not self._adjoint_finite():
                        self.busy = False
                        self._configure()
                        raise SolverError(
                            "adjoint solve produced NaN/Inf (a singular or ill-conditioned "
                            "Jacobian on the trajectory?)", t=ts.getTime(),
                            reason="DIVERGED_NONFINITE", steps=ts.getStepNumber(), phase="adjoint")
                lam = vec_view(self.lam, "w")
                lam.add_(grad_ys[k - 1])
        except PETSc.Error as exc:
            self._sync("adjoint", float("nan"), exc)
            self._fail("adjoint", float("nan"), exc)
        finally:
            self.busy = False
            prob.keep_graphs(False)
        grad_y0 = vec_view(self.lam).clone()
        grad_p = self._param_gradient()
        self.stats.vjps = prob.counters.vjp - v0
        self.stats.graph_hits = prob.counters.graph_hits - h0
        self.stats.adjoint_seconds = _time.perf_counter() - start
        return grad_y0, grad_p

    # -- schedule-driven checkpointing (binomial, disk) ----------------------------------------
    def _replay_step(self, x: torch.Tensor, k: int, *, record: bool) -> torch.Tensor:
        """Re-integrate step ``k`` (from ``t_k`` to ``t_{k+1}``) exactly as the forward solve did."""
        ts, times = self.ts, self.stats.step_times
        ts.removeTrajectory()
        if record:
            ts.setSaveTrajectory()
        if record or not self._replaying:
            # options are read once per adjoint-bearing step (a fresh memory trajectory) and
            # once at the start; no error control: the recorded step is re-taken as it was
            self._configure(force={"ts_adapt_type": "none"})
            self._set_adjoint_mode(True)
            self._replaying = True
        vec_view(self.x, "w").copy_(x)
        ts.setTime(times[k])
        ts.setStepNumber(k)
        ts.restartStep()  # no first-same-as-last reuse of another step's stage
        ts.setMaxTime(times[k + 1])
        ts.setTimeStep(times[k + 1] - times[k])
        # Re-arm the forward's evaluation times (PETSc keeps a cursor into them across solves;
        # their count must not change, see odeint._Call). They are step boundaries, so they
        # never shorten a replayed step.
        ts.setEvaluationTimes(self._eval_times)
        try:
            ts.solve(self.x)
        except PETSc.Error as exc:
            self._sync("adjoint", times[k + 1], exc)
            self._fail("adjoint", times[k + 1], exc)
        self._sync("adjoint", times[k + 1])
        if self.problem.error is not None or ts.getConvergedReason() < 0 \
                or ts.getStepNumber() != k + 1:
            self._fail("adjoint", times[k + 1])
        return vec_view(self.x).clone()

    def _schedule(self, n: int):
        import checkpoint_schedules as cs

        policy = self.opts.checkpoint
        if policy.kind == "binomial":
            # The multistage generator with no disk slots yields the optimal binomial (Revolve)
            # schedule lazily; cs.Revolve precomputes every action (5.8 MiB for 2000 steps).
            return cs.MultistageCheckpointSchedule(n, policy.budget, 0)
        disk = n if policy.disk_budget is None else policy.disk_budget
        return cs.MultistageCheckpointSchedule(n, policy.budget, disk)

    def _adjoint_scheduled(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint sweep driven by a checkpoint schedule from ``checkpoint-schedules``.

        Forward actions re-integrate recorded steps from stored states (the step that a
        reverse action needs is re-integrated with a trajectory); reverse actions run
        one TSAdjoint step; the gradient of each output is added at its step.  States
        go to RAM or to files, as the schedule says; the files are removed at the end,
        whatever happens.
        """
        import checkpoint_schedules as cs

        ts, prob = self.ts, self.problem
        prob.reset_error()
        prob.forget_points()
        v0 = prob.counters.vjp
        start = _time.perf_counter()
        n = self.seg_steps[-1]
        out_at = {step: k for k, step in enumerate(self.seg_steps)}
        vec_view(self.lam, "w").copy_(grad_ys[-1])
        if self.n_params:
            vec_view(self.mu, "w").zero_()
        store = StateStore(self.opts.checkpoint.directory)
        x, cur, recomputed = self._y0, 0, 0
        self._replaying = False
        try:
            for action in (self._schedule(n) if n else ()):
                if isinstance(action, cs.Forward):
                    if cur != action.n0:
                        raise AssertionError("internal: schedule out of step")
                    if action.write_ics:
                        store.put(action.n0, x, action.storage)
                    stop = action.n1 - 1 if action.write_adj_deps else action.n1
                    for k in range(action.n0, stop):
                        x = self._replay_step(x, k, record=False)
                    if action.write_adj_deps:
                        x = self._replay_step(x, action.n1 - 1, record=True)
                    recomputed += action.n1 - action.n0
                    cur = action.n1
                elif isinstance(action, cs.Reverse):
                    ts.adjointSetSteps(action.n1 - action.n0)
                    ts.adjointSolve()
                    self._sync("adjoint", self.stats.step_times[action.n0])
                    if prob.error is not None or ts.getConvergedReason() < 0:
                        self._fail("adjoint", self.stats.step_times[action.n0])
                    if action.n0 in out_at and action.n0 != n:
                        vec_view(self.lam, "w").add_(grad_ys[out_at[action.n0]])
                elif isinstance(action, (cs.Copy, cs.Move)):
                    x = store.get(action.n, action.from_storage, keep=isinstance(action, cs.Copy))
                    cur = action.n
                elif isinstance(action, cs.EndReverse):
                    break
        except PETSc.Error as exc:
            self._sync("adjoint", float("nan"), exc)
            self._fail("adjoint", float("nan"), exc)
        finally:
            self.busy = False
            self._y0 = None
            store.close()
        if not self._adjoint_finite():
            raise SolverError("adjoint solve produced NaN/Inf", t=self.stats.step_times[0],
                              reason="DIVERGED_NONFINITE", steps=0, phase="adjoint")
        st = self.stats
        st.recomputed_steps, st.max_stored_states = recomputed, store.peak
        st.disk_writes = store.disk_writes
        st.vjps = prob.counters.vjp - v0
        st.adjoint_seconds = _time.perf_counter() - start
        grad_p = self._param_gradient()
        return vec_view(self.lam).clone(), grad_p


def _write_state(path: str, x: torch.Tensor) -> None:
    """Write a flat float64 state as raw bytes (read back with ``np.fromfile``)."""
    x.numpy().tofile(path)


class StateStore:
    """Checkpointed states of one adjoint sweep: in RAM, or as files in a private directory.

    Parameters
    ----------
    directory : str or None
        Parent of the private directory for states the schedule sends to disk
        (created on the first write, removed by :meth:`close`).
    """

    def __init__(self, directory: str | None) -> None:
        self.parent = directory
        self.ram: dict[int, torch.Tensor] = {}
        self.files: dict[int, str] = {}
        self.dir: str | None = None
        self.peak = 0
        self.disk_writes = 0

    def put(self, n: int, x: torch.Tensor, storage) -> None:
        import checkpoint_schedules as cs

        if storage == cs.StorageType.DISK:
            path = self._write(n, x)
            self.files[n] = path
            self.disk_writes += 1
        else:
            self.ram[n] = x.clone()
        self.peak = max(self.peak, len(self.ram) + len(self.files))

    def get(self, n: int, storage, *, keep: bool) -> torch.Tensor:
        import checkpoint_schedules as cs

        if storage != cs.StorageType.DISK:
            return self.ram[n].clone() if keep else self.ram.pop(n)
        path = self.files[n]
        x = torch.from_numpy(np.fromfile(path, dtype=np.float64))
        if not keep:
            os.remove(path)
            del self.files[n]
        return x

    def _write(self, n: int, x: torch.Tensor) -> str:
        if self.parent is None:
            raise AssertionError("internal: a RAM-only schedule asked for disk storage")
        try:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="pnode-checkpoints-", dir=self.parent)
            path = os.path.join(self.dir, f"state-{n}.f64")
            _write_state(path, x)
        except OSError as exc:
            raise CheckpointError(
                f"could not write a checkpoint to {self.parent!r}: {exc.strerror or exc}; free "
                "space there, choose another directory, or raise the RAM budget",
                directory=self.parent) from exc
        return path

    def close(self) -> None:
        """Forget the RAM states and remove the files (and the private directory)."""
        self.ram.clear()
        self.files.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
