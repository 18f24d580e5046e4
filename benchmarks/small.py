"""Section 6: small scientific-ML problems, where the engine's fixed costs decide (issue 17).

Run alone: ``python -m benchmarks.small [--quick]``.  Every time is one training
iteration (forward + gradient of ``sum(y(1)**2)`` into ``.grad``), float64, one
torch thread; the configurations of one row are called round-robin in this
process and the numbers are medians, so every ratio compares timings taken
under the same machine load.  The clock is this process's CPU time by default
(``--clock cpu``; one torch thread and serial PETSc, so it equals wall time on an
idle machine) because on a shared machine wall time mostly measures the other
load; ``--clock wall`` times wall-clock.

- *RK4 rows*: MLP 2-16-2 (batch 16, 50 steps), MLP 32-128-32 (batch 256,
  20 steps) and a two-layer 3x3 convolution field on 16 channels of 8x8 (batch
  128, 10 steps); pnode ``"stages"`` and ``"graph"`` against plain-torch backprop
  through the same classical RK4 loop (the denominator of every ratio),
  torchdiffeq backprop and torchdiffeq's continuous adjoint.
- *fixed cost*: a ``Linear(4, 4)`` field with forward Euler; one step, and the
  slope per extra step (one stage) of pnode and of plain backprop.
- *ROBER*: kencarp4 at rtol 1e-6 solve + gradient against scipy Radau
  forward-only (see :mod:`benchmarks.stiff`), round-robin.
- *adaptive*: dopri5 at rtol 1e-6 on the MLP 32-128-32 and the conv field;
  pnode against torchdiffeq backprop and adjoint.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

import pnode
from benchmarks.common import interleaved_medians, md_table, rk4_loop

RK4_CONFIGS = ("pnode-stages", "pnode-graph", "torch-backprop", "torchdiffeq-backprop",
               "torchdiffeq-adjoint")
ADAPTIVE_CONFIGS = ("pnode-stages", "pnode-graph", "torchdiffeq-backprop", "torchdiffeq-adjoint")


class MLPField(nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1) + b2`` (float64)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, dim)).double()

    def forward(self, t, y):
        return self.net(y)


class ConvField(nn.Module):
    """``f(t, y) = conv2(tanh(conv1(y)))``, 3x3 convolutions keeping the channels (float64)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1).double()
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1).double()

    def forward(self, t, y):
        return self.c2(torch.tanh(self.c1(y)))


class LinearField(nn.Module):
    """``f(t, y) = W y + b`` with ``Linear(4, 4)``: the field of the fixed-cost row."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, t, y):
        return self.lin(y)


@dataclass(frozen=True)
class Case:
    """One row: the field, the batch and the RK4 step count."""

    name: str
    field: str  # "mlp" or "conv"
    batch: int
    steps: int
    dim: int = 2  # MLP in/out size, or conv channels
    width: int = 16  # MLP hidden width (unused for conv)
    side: int = 8  # conv image side

    def label(self) -> str:
        if self.field == "conv":
            return f"conv {self.dim}ch {self.side}x{self.side}, batch {self.batch}"
        return f"MLP {self.dim}-{self.width}-{self.dim}, batch {self.batch}"

    def build(self, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """Field, initial state and output times ``[0, 1]`` (seeded)."""
        torch.manual_seed(seed)
        if self.field == "conv":
            func: nn.Module = ConvField(self.dim)
            y0 = torch.randn(self.batch, self.dim, self.side, self.side, dtype=torch.float64)
        else:
            func = MLPField(self.dim, self.width)
            y0 = torch.randn(self.batch, self.dim, dtype=torch.float64)
        return func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64)


RK4_CASES = (
    Case("mlp-small", "mlp", 16, 50, 2, 16),
    Case("mlp", "mlp", 256, 20, 32, 128),
    Case("conv", "conv", 128, 10, 16),
)
ADAPTIVE_CASES = (Case("mlp", "mlp", 256, 0, 32, 128), Case("conv", "conv", 128, 0, 16))
ADAPTIVE_RTOL, ADAPTIVE_ATOL = 1e-6, 1e-8

#: issue-17 goals on the RK4 rows: (case, numerator, denominator, bound, "le" or "ge")
GOALS = (
    ("mlp-small", "pnode-graph", "torch-backprop", 1.5, "le"),
    ("mlp-small", "torchdiffeq-adjoint", "pnode-graph", 2.0, "ge"),
    ("mlp", "pnode-graph", "torch-backprop", 1.15, "le"),
    ("mlp", "pnode-stages", "torch-backprop", 1.5, "le"),
    ("mlp", "torchdiffeq-adjoint", "pnode-stages", 1.3, "ge"),
    ("conv", "pnode-graph", "torch-backprop", 1.05, "le"),
)
FIXED_GOAL_MS, STAGE_GOAL_US, ROBER_GOAL = 0.25, 50.0, 10.0


def final_state(cfg: str, func: Callable, y: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
    """State at ``t[-1]`` by ``cfg``: RK4 with ``steps`` equal steps, or adaptive dopri5 if 0."""
    if steps:
        kw = {"method": "rk4", "options": {"step_size": 1.0 / steps}}
    else:
        kw = {"method": "dopri5", "rtol": ADAPTIVE_RTOL, "atol": ADAPTIVE_ATOL}
    if cfg.startswith("pnode-"):
        return pnode.odeint(func, y, t, checkpoint=cfg.removeprefix("pnode-"), **kw)[-1]
    if cfg == "torch-backprop":
        return rk4_loop(func, y, steps)
    import torchdiffeq

    if cfg == "torchdiffeq-backprop":
        return torchdiffeq.odeint(func, y, t, **kw)[-1]
    if cfg == "torchdiffeq-adjoint":
        return torchdiffeq.odeint_adjoint(func, y, t, adjoint_params=tuple(func.parameters()), **kw)[-1]
    raise ValueError(f"Invalid configuration {cfg!r}; choose one of {RK4_CONFIGS}")


def iteration(cfg: str, func: nn.Module, y0: torch.Tensor, t: torch.Tensor,
              steps: int) -> Callable[[], None]:
    """One training iteration of ``cfg`` as a closure (gradients land in ``.grad``)."""
    def run() -> None:
        y = y0.clone().requires_grad_()
        final_state(cfg, func, y, t, steps).pow(2).sum().backward()
    return run


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_cases(cases, configs, repeats: int, clock: str = "cpu") -> list[dict]:
    """Round-robin medians (seconds per iteration) of every configuration on every case."""
    rows = []
    for case in cases:
        func, y0, t = case.build()
        fns = {c: iteration(c, func, y0, t, case.steps) for c in configs}
        rows.append({"case": asdict(case),
                     "seconds": interleaved_medians(fns, repeats, clock=CLOCKS[clock])})
    return rows


def _euler_fns(steps: int) -> dict[str, Callable[[], None]]:
    func = LinearField()
    torch.manual_seed(1)
    y0 = torch.randn(4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    h = 1.0 / steps

    def pnode_run() -> None:
        y = y0.clone().requires_grad_()
        pnode.odeint(func, y, t, method="euler", options={"step_size": h})[-1].pow(2).sum().backward()

    def backprop_run() -> None:
        y = y0.clone().requires_grad_()
        x = y
        for i in range(steps):
            x = x + h * func(torch.tensor(i * h, dtype=torch.float64), x)
        x.pow(2).sum().backward()

    return {f"pnode-{steps}": pnode_run, f"backprop-{steps}": backprop_run}


def fixed_cost(repeats: int, extra: int = 20, clock: str = "cpu") -> dict:
    """Linear(4, 4) with Euler: one-step time, per-extra-step slope and the fixed part (seconds)."""
    fns = {**_euler_fns(1), **_euler_fns(1 + extra)}
    med = interleaved_medians(fns, repeats, warmup=2, clock=CLOCKS[clock])
    out = {"extra_steps": extra}
    for who in ("pnode", "backprop"):
        one, many = med[f"{who}-1"], med[f"{who}-{1 + extra}"]
        slope = (many - one) / extra
        out[who] = {"one_step": one, "per_step": slope, "fixed": one - slope}
    return out


def rober(repeats: int, clock: str = "cpu") -> dict:
    """ROBER [0, 100], kencarp4 rtol 1e-6 solve + gradient and scipy Radau forward-only, round-robin."""
    import numpy as np
    from scipy.integrate import solve_ivp

    from benchmarks import stiff
    from benchmarks.sensitivities import reference_gradient

    case = stiff.ROBER
    system = case.system()

    def radau() -> None:
        sol = solve_ivp(lambda _, y: system.f(y), (case.t[0], case.t[-1]), np.array(case.y0),
                        method="Radau", t_eval=np.array(case.t), rtol=1e-6, atol=1e-10,
                        jac=lambda _, y: system.jac(y))
        if not sol.success:
            raise RuntimeError(sol.message)

    got = stiff._pnode_gradient(case, "kencarp4", 1e-6, 1e-10)[0]
    ref = reference_gradient(system, np.array(case.y0), np.array(case.t), np.array(case.weights),
                             case.ref_atol)[0]
    med = interleaved_medians({"pnode": lambda: stiff._pnode_gradient(case, "kencarp4", 1e-6, 1e-10),
                               "radau": radau}, repeats, clock=CLOCKS[clock])
    e0, ep = stiff._errors(got, ref, len(case.y0))
    return {"pnode_seconds": med["pnode"], "radau_seconds": med["radau"],
            "ratio": med["pnode"] / med["radau"], "err_y0": e0, "err_p": ep}


def run(quick: bool = False, rk4_cases=RK4_CASES, adaptive_cases=ADAPTIVE_CASES,
        repeats: int | None = None, clock: str = "cpu") -> dict:
    """Every part of the section (see the module docstring); seconds per iteration."""
    if clock not in CLOCKS:
        raise ValueError(f"Invalid clock {clock!r}; choose one of {sorted(CLOCKS)}")
    torch.set_num_threads(1)
    repeats = repeats or (3 if quick else 7)
    return {
        "clock": clock,
        "rk4": time_cases(rk4_cases, RK4_CONFIGS, repeats, clock),
        "fixed": fixed_cost(max(repeats, 5) * 3, clock=clock),
        "rober": rober(max(repeats // 2, 1), clock),
        "adaptive": time_cases(adaptive_cases, ADAPTIVE_CONFIGS, max(repeats // 2, 1), clock),
    }


def _status(ratio: float, bound: float, kind: str) -> str:
    met = ratio <= bound if kind == "le" else ratio >= bound
    if met:
        return "met"
    miss = ratio / bound if kind == "le" else bound / ratio
    return f"missed by {100 * (miss - 1):.0f}%"


def goal_rows(res: dict) -> list[list[str]]:
    """Every goal of issue 17: [goal, value, status]."""
    by = {r["case"]["name"]: r["seconds"] for r in res["rk4"]}
    out = []
    for name, num, den, bound, kind in GOALS:
        if name not in by:
            continue
        ratio = by[name][num] / by[name][den]
        out.append([f"{name}: {num} / {den} {'<=' if kind == 'le' else '>='} {bound}", f"{ratio:.2f}",
                    _status(ratio, bound, kind)])
    fx = res["fixed"]
    fixed_ms = 1e3 * fx["pnode"]["fixed"]
    out.append([f"fixed cost per solve + gradient <= {FIXED_GOAL_MS} ms", f"{fixed_ms:.3f} ms",
                _status(fixed_ms, FIXED_GOAL_MS, "le")])
    stage_us = 1e6 * (fx["pnode"]["per_step"] - fx["backprop"]["per_step"])
    out.append([f"per extra stage above backprop <= {STAGE_GOAL_US:.0f} us", f"{stage_us:.0f} us",
                _status(stage_us, STAGE_GOAL_US, "le")])
    rb = res["rober"]
    out.append([f"ROBER kencarp4 / Radau forward <= {ROBER_GOAL:.0f}", f"{rb['ratio']:.1f}",
                _status(rb["ratio"], ROBER_GOAL, "le")])
    return out


def tables(res: dict) -> str:
    """Markdown: the RK4 ratios, fixed cost, ROBER, adaptive rows and the goals."""
    rk4 = [[Case(**r["case"]).label(), r["case"]["steps"],
            *(r["seconds"][c] / r["seconds"]["torch-backprop"] for c in RK4_CONFIGS),
            1e3 * r["seconds"]["torch-backprop"]] for r in res["rk4"]]
    fx = res["fixed"]
    fixed = [[who, 1e3 * fx[who]["one_step"], 1e6 * fx[who]["per_step"], 1e3 * fx[who]["fixed"]]
             for who in ("pnode", "backprop")]
    rb = res["rober"]
    adaptive = [[Case(**r["case"]).label(), *(1e3 * r["seconds"][c] for c in ADAPTIVE_CONFIGS),
                 r["seconds"]["torchdiffeq-adjoint"] / r["seconds"]["pnode-stages"],
                 r["seconds"]["torchdiffeq-adjoint"] / r["seconds"]["pnode-graph"]]
                for r in res["adaptive"]]
    return "\n\n".join([
        "### 6. Small problems (issue 17)\n\nTime per training iteration (forward + gradient of "
        f"sum(y(1)^2); {'CPU time of the process' if res.get('clock', 'cpu') == 'cpu' else 'wall time'}"
        "), float64, 1 thread, configurations of a row timed round-robin in one process "
        "(medians). RK4 fixed steps on [0, 1]; ratio to plain-torch backprop through the same "
        "classical RK4 loop (torchdiffeq's rk4 is the 3/8 rule, same cost).",
        md_table(["problem", "RK4 steps", *RK4_CONFIGS, "backprop (ms)"], rk4),
        f"Fixed cost: Linear(4, 4) field, forward Euler on [0, 1], state of 4; one step, and the "
        f"slope per extra step (1 vs {1 + fx['extra_steps']} steps); fixed = one step - slope.",
        md_table(["", "one step (ms)", "per extra step (us)", "fixed (ms)"], fixed),
        f"ROBER [0, 100], kencarp4 rtol 1e-6 solve + gradient {1e3 * rb['pnode_seconds']:.1f} ms, "
        f"scipy Radau forward-only {1e3 * rb['radau_seconds']:.1f} ms: {rb['ratio']:.1f}x; gradient "
        f"errors (y0, params) {rb['err_y0']:.1e}, {rb['err_p']:.1e}.",
        f"Adaptive dopri5 (rtol {ADAPTIVE_RTOL:g}, atol {ADAPTIVE_ATOL:g}) on [0, 1], ms per iteration:",
        md_table(["problem", *ADAPTIVE_CONFIGS, "tdq-adjoint / stages", "tdq-adjoint / graph"],
                 adaptive),
        "Issue-17 goals:",
        md_table(["goal", "value", "status"], goal_rows(res)),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = ap.parse_args()
    print(tables(run(args.quick, clock=args.clock)))


if __name__ == "__main__":
    main()
