"""Construction of a solver's PETSc objects: the TS, its vectors and Jacobian matrices.

:class:`TSObjects` is the one owner of those objects (destroyed explicitly by
:meth:`TSObjects.destroy`) and of the PETSc options that configure them: pnode's
defaults are inserted into PETSc's options database around each
``setFromOptions`` and removed after, so the command line (``-pnode_...``)
always wins over them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property

from petsc4py import PETSc

from .._petsc import inserted_options
from . import failures
from .detector import MAX_REJECTIONS
from .methods import Method
from .observers import stage_weights
from .problem import TorchProblem
from .trajectory import configure_memory_trajectory

__all__ = ["TSObjects", "DENSE_JACOBIAN_MAX"]

# Systems up to this size get an assembled dense Jacobian and a direct (LU) solve
# (measured in benchmarks/engine.py: dense wins up to ~256 unknowns, Krylov beyond).
DENSE_JACOBIAN_MAX = 256


class TSObjects:
    """The PETSc TS of one solver, with its Vecs and Mats, built from the problem and method.

    Parameters
    ----------
    problem : TorchProblem
        The callbacks the TS calls.
    method : Method
        The scheme (TS type, subtype, theta parameters).
    opts : SolveOptions
        Tolerances, step limits and PETSc options.
    comm : PETSc.Comm
        ``COMM_SELF`` or the communicator of a data-parallel solve.
    fixed : bool
        Fixed steps (no adaptivity).
    monitor : callable
        The TS monitor (records the steps of the forward sweep).

    Attributes
    ----------
    ts : PETSc.TS
    x, lam, mu : PETSc.Vec
        The state, the state adjoint and the parameter adjoint (cost gradients).
    """

    def __init__(self, problem: TorchProblem, method: Method, opts, comm: PETSc.Comm, *,
                 fixed: bool, monitor: Callable) -> None:
        self.problem, self.method, self.opts, self.comm, self.fixed = \
            problem, method, opts, comm, fixed
        self._objs: list = []
        self.destroyed = False
        self.adjoint_mode = False
        self.ts = PETSc.TS().create(comm=comm)
        self._objs.append(self.ts)
        self._set_method()
        n, n_p = problem.n, problem.n_params
        self.x = self._vec(n)
        self.lam = self._vec(n)
        self.mu = self._vec(max(n_p, 1))
        self._set_explicit_part()
        self._set_implicit_part()
        self._set_controls(monitor)
        try:
            self.configure()
        except ValueError:  # options PETSc refuses: nothing of this solver survives
            self.destroy()
            raise

    # -- construction -----------------------------------------------------------------
    def _set_method(self) -> None:
        ts, method, opts = self.ts, self.method, self.opts
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
            self.problem.stage_weight = stage_weights(method.tableau)  # from the method registry
        if method.ts_type == "theta":
            ts.setTheta(opts.theta if opts.theta is not None else method.theta)
            ts.setThetaEndpoint(opts.endpoint if opts.endpoint is not None else method.endpoint)

    def _set_explicit_part(self) -> None:
        ts, problem, n, n_p = self.ts, self.problem, self.problem.n, self.problem.n_params
        if problem.explicit is not None:
            self.f_rhs = self._vec(n)
            self.J_rhs = self._shell(n, n, "rhs_x")
            ts.setRHSFunction(problem.rhs_function, self.f_rhs)
            ts.setRHSJacobian(problem.rhs_jacobian, self.J_rhs, self.J_rhs)
            if n_p and self.method.ts_type == "rk":
                # explicit RK: the problem accumulates the parameter gradient with PETSc's
                # stage weights (bit for bit), so PETSc makes two callbacks per adjoint
                # stage instead of four (see param_gradient.ParamGradient)
                problem.accumulate_params(True)
            elif n_p:
                self.Jp_rhs = self._shell(n, n_p, "rhs_p")
                ts.setRHSJacobianP(problem.rhs_jacobian_p, self.Jp_rhs)
        elif self.method.ts_type == "arkimex":
            # Fully implicit ARK as an additive scheme with a zero explicit part.  Without
            # an RHS function PETSc runs its DIRK path, which starts each solve from a slope
            # evaluated at a stale stage time (wrong for time-dependent func); with G = 0
            # the first explicit stage is f(t_n, y_n) exactly, the scheme is unchanged, and
            # the adjoint (which assumes that stage) is exact.
            self.f_rhs = self._vec(n)
            self.J_rhs = self._shell(n, n, "zero")
            ts.setRHSFunction(problem.zero_rhs, self.f_rhs)
            ts.setRHSJacobian(problem.noop_jacobian, self.J_rhs, self.J_rhs)

    def _set_implicit_part(self) -> None:
        ts, problem, n, n_p = self.ts, self.problem, self.problem.n, self.problem.n_params
        if problem.implicit is None:
            return
        self.f_imp = self._vec(n)
        ts.setIFunction(problem.ifunction, self.f_imp)
        # modified Newton (a lag above 1) also across the stage solves of one step, while
        # they converge quickly (jacobians.Assembly)
        problem.assembly.reuse_stages = self.opts.jacobian_lag > 1
        if problem.dense:
            self.J_imp = self._mat(PETSc.Mat().createDense((n, n), comm=self.comm))
        elif problem.jacobian == "blocks":
            self.J_imp = self._mat(PETSc.Mat().createBAIJ((n, n), problem.block, nnz=1,
                                                           comm=self.comm))
        else:
            self.J_imp = self._shell(n, n, "ijac_x")
        ts.setIJacobian(problem.ijacobian, self.J_imp, self.J_imp)
        if n_p:
            self.Jp_imp = self._shell(n, n_p, "ijac_p")
            ts.setIJacobianP(problem.ijacobian_p, self.Jp_imp)

    def _set_controls(self, monitor: Callable) -> None:
        ts, opts = self.ts, self.opts
        in_petsc = self.problem.n_params and self.problem.param_grad is None
        ts.setCostGradients(self.lam, self.mu if in_petsc else None)
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setMaxSteps(opts.max_num_steps)
        ts.setErrorIfStepFails(False)
        # a bounded number of consecutive rejections: a step that cannot be taken ends the
        # solve (DIVERGED_STEP_REJECTED) instead of retrying with ever smaller steps forever
        ts.setMaxStepRejections(MAX_REJECTIONS if not self.fixed else 0)
        ts.setMaxSNESFailures(-1 if not self.fixed else 1)
        ts.setMonitor(monitor)
        if not self.fixed:
            ts.setTolerances(rtol=opts.rtol, atol=opts.atol)

    def _vec(self, n: int) -> PETSc.Vec:
        v = PETSc.Vec().createSeq(n, comm=self.comm) if self.comm.size == 1 else \
            PETSc.Vec().createMPI((n, PETSc.DECIDE), comm=self.comm)
        self._objs.append(v)
        return v

    def _mat(self, mat: PETSc.Mat) -> PETSc.Mat:
        mat.setUp()
        self._objs.append(mat)
        return mat

    def _shell(self, m: int, n: int, kind: str) -> PETSc.Mat:
        # local sizes given, global ones summed over the communicator's ranks
        return self._mat(PETSc.Mat().createPython(((m, None), (n, None)),
                                                  context=self.problem.shell(kind), comm=self.comm))

    def destroy(self) -> None:
        """Destroy the PETSc objects (one owner, explicit destruction)."""
        self.problem.views.clear()  # the views' references would keep Vecs alive
        for obj in reversed(self._objs):
            obj.destroy()
        self._objs.clear()
        self.destroyed = True

    # -- options ------------------------------------------------------------------------
    def defaults(self) -> dict[str, str]:
        """pnode's default PETSc options for this solver (the command line overrides them)."""
        problem, opts = self.problem, self.opts
        d = {
            "ts_trajectory_type": "memory",
            # TSHistory re-sorts all step times on every step (quadratic in the step count);
            # the adjoint does not use it.
            "ts_trajectory_use_history": "0",
            "ts_adapt_type": "none" if self.fixed else "basic",
            **opts.checkpoint.petsc_defaults(),
        }
        if problem.implicit is not None:
            d.update(self._implicit_defaults())
        d.update(dict(opts.petsc_options))
        return d

    def _implicit_defaults(self) -> dict[str, str]:
        problem, opts = self.problem, self.opts
        # Forward Newton re-uses the Jacobian within one stage solve (modified Newton);
        # the adjoint needs the exact Jacobian at every stage and forces a lag of 1.
        d = {"snes_rtol": repr(opts.snes_rtol), "snes_atol": "1e-14",
             "snes_max_it": "50", "snes_lag_jacobian": str(opts.jacobian_lag)}
        if problem.dense:
            d.update({"ksp_type": "preonly", "pc_type": "lu"})
        elif problem.jacobian == "blocks":
            # block diagonal: LU in the natural ordering has no fill
            d.update({"ksp_type": "preonly", "pc_type": "lu",
                      "pc_factor_mat_ordering_type": "natural"})
        else:
            # Tight tolerances: the transposed adjoint solves reuse this KSP, and the
            # default rtol 1e-5 would make gradients merely "close".
            d.update({"ksp_type": "gmres", "pc_type": "none",
                      "ksp_rtol": repr(opts.ksp_rtol), "ksp_atol": "1e-50",
                      "ksp_gmres_restart": "100", "ksp_max_it": "10000"})
        return d

    @contextmanager
    def options(self, force: dict[str, str] | None = None) -> Iterator[None]:
        """Insert this solver's options around a set-up; command-line values win.

        ``force`` holds values that must apply whatever the command line says (they
        are restored afterwards).
        """
        pre = self.opts.options_prefix
        # TSTrajectory reads its options without the TS prefix (petsc4py cannot set one).
        defaults = {(k if k.startswith("ts_trajectory_") else pre + k): v
                    for k, v in self.defaults().items()}
        with inserted_options({pre + k: v for k, v in (force or {}).items()}, override=True), \
                inserted_options(defaults):
            yield

    def configure(self, force: dict[str, str] | None = None) -> None:
        """Apply the options to the TS (``setFromOptions``); leaves adjoint mode."""
        with self.options(force):
            try:
                self.ts.setFromOptions()
            except PETSc.Error as exc:
                raise failures.options_error(exc) from None
        self.adjoint_mode = False
        self._plain = force is None

    def configure_forward(self) -> None:
        """:meth:`configure` for a forward solve, or only its fresh trajectory's settings.

        An explicit method's TS that the last :meth:`configure` (without ``force``) left
        as it is needs nothing but the new trajectory's type and flags
        (:mod:`.trajectory`), which saves a whole ``TSSetFromOptions``.  (So options
        put into PETSc's database after a solver was built reach it after the next
        change pnode makes, or in a new solver.)
        """
        flags = self.memory_flags
        if flags is None or not getattr(self, "_plain", False) or self.adjoint_mode:
            self.configure()
            return
        configure_memory_trajectory(self.ts, use_history=flags[0], solution_only=flags[1])

    @cached_property
    def memory_flags(self) -> tuple[bool, bool] | None:
        """``(use_history, solution_only)`` of a plain memory trajectory, or ``None``.

        ``None``: the options ask for more than :func:`configure_memory_trajectory` sets
        (or the problem is implicit), so a forward solve needs a whole ``configure``.
        The options are fixed for the solver's life (they are part of its cache key).
        """
        traj = {k: v for k, v in self.defaults().items() if k.startswith("ts_trajectory_")}
        flags = [traj.get(k) for k in ("ts_trajectory_use_history", "ts_trajectory_solution_only")]
        plain = (self.problem.implicit is None and traj.get("ts_trajectory_type") == "memory"
                 and len(traj) == 3 and all(v in ("0", "1") for v in flags))
        return (flags[0] == "1", flags[1] == "1") if plain else None

    def set_adjoint_mode(self, on: bool) -> None:
        """Switch SNES Jacobian lagging off for the adjoint sweep, and back.

        TSAdjoint computes stage Jacobians through SNESComputeJacobian, which honours
        ``snes_lag_jacobian``: a lagged (stale) Jacobian there would make the gradient
        wrong, so the adjoint always runs with lag 1, whatever the options say.
        """
        if self.problem.implicit is None or on == self.adjoint_mode:
            return
        snes = self.ts.getSNES()
        if on:
            pre = self.opts.options_prefix
            lag_one = {pre + "snes_lag_jacobian": "1", pre + "snes_lag_preconditioner": "1"}
            with inserted_options(lag_one, override=True):
                snes.setFromOptions()
        else:
            with self.options():
                snes.setFromOptions()
        self.adjoint_mode = on
