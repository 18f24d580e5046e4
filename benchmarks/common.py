"""Shared pieces of the benchmark suite: the goal problem, the configurations and timing helpers.

The goal problem of issue 5: an MLP field f 32 -> width -> 32 (tanh), a batch of
initial states, RK4 with fixed steps over [0, 1], float64, one torch thread, and
the loss ``sum(y(1)**2)``.  A *configuration* is one way to get the gradient of
that loss: pnode with a checkpoint policy, plain-torch backprop through an RK4
loop, torchdiffeq backprop or torchdiffeq's continuous adjoint.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

import pnode
from benchmarks.engine import mlp_field

__all__ = ["CONFIGS", "PNODE_CONFIGS", "Problem", "build", "gradient", "iteration", "machine_info",
           "interleaved_medians", "rk4_loop", "rk4_38_loop"]

PNODE_CONFIGS = ("pnode-stages", "pnode-solution", "pnode-graph", "pnode-binomial8")
CONFIGS = (*PNODE_CONFIGS, "torch-backprop", "torchdiffeq-backprop", "torchdiffeq-adjoint")


@dataclass(frozen=True)
class Problem:
    """Size of one instance of the goal problem."""

    steps: int = 20
    batch: int = 256
    width: int = 128
    dim: int = 32

    def label(self) -> str:
        return f"steps={self.steps}, batch={self.batch}, width={self.width}"

    def as_dict(self) -> dict:
        return asdict(self)


def build(problem: Problem, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Field, initial state and output times ``[0, 1]`` of ``problem`` (float64, seeded)."""
    torch.manual_seed(seed)
    func = mlp_field(problem.dim, problem.width)
    y0 = torch.randn(problem.batch, problem.dim, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return func, y0, t


def rk4_loop(func: Callable, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Classical RK4 over [0, 1] in ``steps`` equal steps, written plainly (backprop-able)."""
    h = 1.0 / steps
    for i in range(steps):
        t0 = torch.tensor(i * h, dtype=y.dtype)
        k1 = func(t0, y)
        k2 = func(t0 + h / 2, y + (h / 2) * k1)
        k3 = func(t0 + h / 2, y + (h / 2) * k2)
        k4 = func(t0 + h, y + h * k3)
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def rk4_38_loop(func: Callable, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Kutta's 3/8-rule RK4, the scheme torchdiffeq's ``"rk4"`` uses, written plainly."""
    h = 1.0 / steps
    for i in range(steps):
        t0 = torch.tensor(i * h, dtype=y.dtype)
        k1 = func(t0, y)
        k2 = func(t0 + h / 3, y + (h / 3) * k1)
        k3 = func(t0 + 2 * h / 3, y + h * (k2 - k1 / 3))
        k4 = func(t0 + h, y + h * (k1 - k2 + k3))
        y = y + (h / 8) * (k1 + 3 * (k2 + k3) + k4)
    return y


def final_state(cfg: str, func: torch.nn.Module, y: torch.Tensor, t: torch.Tensor,
                steps: int) -> torch.Tensor:
    """State at t = 1 computed by configuration ``cfg`` (differentiable)."""
    opts = {"step_size": 1.0 / steps}
    if cfg.startswith("pnode-"):
        policy = cfg.removeprefix("pnode-")
        policy = pnode.Checkpoint.binomial(8) if policy == "binomial8" else policy
        return pnode.odeint(func, y, t, method="rk4", options=opts, checkpoint=policy)[-1]
    if cfg == "torch-backprop":
        return rk4_loop(func, y, steps)
    import torchdiffeq

    if cfg == "torchdiffeq-backprop":
        return torchdiffeq.odeint(func, y, t, method="rk4", options=opts)[-1]
    if cfg == "torchdiffeq-adjoint":
        return torchdiffeq.odeint_adjoint(func, y, t, method="rk4", options=opts,
                                          adjoint_params=tuple(func.parameters()))[-1]
    raise ValueError(f"Invalid configuration {cfg!r}; choose one of {CONFIGS}")


def iteration(cfg: str, func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor,
              steps: int) -> Callable[[], None]:
    """One training iteration (forward + gradient of the loss into ``.grad``) as a closure."""
    def run() -> None:
        y = y0.clone().requires_grad_()
        final_state(cfg, func, y, t, steps).pow(2).sum().backward()
    return run


def gradient(cfg: str, func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor,
             steps: int) -> torch.Tensor:
    """Gradient of the loss with respect to ``y0`` and every parameter, flattened into one vector."""
    y = y0.clone().requires_grad_()
    params = list(func.parameters())
    grads = torch.autograd.grad(final_state(cfg, func, y, t, steps).pow(2).sum(), [y, *params])
    return torch.cat([g.reshape(-1) for g in grads])


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int,
                        warmup: int = 1, clock: Callable[[], float] = time.perf_counter
                        ) -> dict[str, float]:
    """Median wall time of each callable, calling them round-robin so load changes hit all alike.

    Parameters
    ----------
    fns : dict of str to callable
        What to time, by name.
    repeats : int
        Timed calls of each callable.
    warmup : int
        Untimed calls of each callable first (solver caches, allocator).
    clock : callable
        The clock: wall time by default; ``time.process_time`` counts this process's
        CPU time only, which on a shared machine is far less disturbed by other load.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            s = clock()
            fn()
            times[k].append(clock() - s)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_info() -> dict:
    """Machine, CPU, date and library versions, for the header of every report."""
    import petsc4py
    from petsc4py import PETSc

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import os

        load = os.getloadavg()[0]
        cores = os.cpu_count()
    except OSError:
        load, cores = float("nan"), None
    try:
        import torchdiffeq

        tdq = torchdiffeq.__version__
    except ImportError:
        tdq = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}",
        "cpu": cpu,
        "cores": cores,
        "load_average_1min": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "petsc": ".".join(map(str, PETSc.Sys.getVersion())),
        "petsc4py": petsc4py.__version__,
        "torchdiffeq": tdq,
        "torch_threads": torch.get_num_threads(),
    }


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are written with 3 significant digits."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
