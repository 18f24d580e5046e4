"""Section 4: stiff systems, pnode's implicit discrete adjoints against scipy Radau and torchdiffeq.

Run alone: ``python -m benchmarks.stiff [--quick]``.

For Robertson kinetics on [0, 100] and Van der Pol (mu = 1000) the loss is a
weighted sum of the states at the output times.  pnode's time is one solve plus
its gradient, scipy's a forward-only ``solve_ivp(method="Radau")`` with a
hand-written Jacobian at the same tolerances: CPU time of this process, medians
of round-robin repeats after a warm-up (so load on a shared machine, including
the torchdiffeq children, hits both alike); the reference gradient comes from forward sensitivity equations
(:mod:`benchmarks.sensitivities`, Radau at rtol 1e-12).  torchdiffeq's
``odeint_adjoint`` with dopri5 runs in a child process under a hard timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import pnode
from benchmarks.common import interleaved_medians, md_table
from benchmarks.sensitivities import StiffSystem, reference_gradient, robertson, van_der_pol

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """One stiff problem: model, numpy twin, initial state, output times and loss weights."""

    name: str
    y0: tuple[float, ...]
    t: tuple[float, ...]
    weights: tuple[tuple[float, ...], ...]
    ref_atol: float

    def model(self) -> torch.nn.Module:
        from pnode.models import Robertson, VanDerPol

        return Robertson() if self.name == "rober" else VanDerPol(1000.0)

    def system(self) -> StiffSystem:
        return robertson(np.array([0.04, 3e7, 1e4])) if self.name == "rober" else van_der_pol(1000.0)


ROBER = Case("rober", (1.0, 0.0, 0.0), (0.0, 1.0, 10.0, 100.0),
             ((0.0, 0.0, 0.0), (1.0, 1e4, 1.0), (0.5, -2e4, 1.0), (1.0, 3e4, -0.5)), 1e-16)
# the initial layer and the slow phase, up to just before the first relaxation jump (t ~ 0.81);
# through the jump pnode needs rtol 1e-8 and ~650 steps, beyond this suite's time budget
VDP = Case("vdp", (2.0, 0.0), (0.0, 0.25, 0.5, 0.75),
           ((0.0, 0.0), (1.0, 0.1), (-1.0, 0.05), (2.0, -0.1)), 1e-10)


def _pnode_gradient(case: Case, method: str, rtol: float, atol: float) -> tuple[np.ndarray, object]:
    model = case.model()
    y0 = torch.tensor(case.y0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(case.t, dtype=torch.float64)
    w = torch.tensor(case.weights, dtype=torch.float64)
    ys = pnode.odeint(model, y0, t, method=method, rtol=rtol, atol=atol)
    grads = torch.autograd.grad((ys * w).sum(), [y0, *model.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]).numpy(), pnode.last_stats()


def _errors(got: np.ndarray, ref: np.ndarray, n: int) -> tuple[float, float]:
    rel = [np.linalg.norm(got[s] - ref[s]) / np.linalg.norm(ref[s]) for s in (slice(0, n), slice(n, None))]
    return float(rel[0]), float(rel[1])


def torchdiffeq_child(name: str, rtol: float, atol: float) -> dict:
    """torchdiffeq dopri5 adjoint solve + gradient of the case's loss (run in a child process)."""
    import torchdiffeq

    torch.set_num_threads(1)
    case = ROBER if name == "rober" else VDP
    model = case.model()
    y0 = torch.tensor(case.y0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(case.t, dtype=torch.float64)
    w = torch.tensor(case.weights, dtype=torch.float64)
    s = time.perf_counter()
    ys = torchdiffeq.odeint_adjoint(model, y0, t, method="dopri5", rtol=rtol, atol=atol)
    grads = torch.autograd.grad((ys * w).sum(), [y0, *model.parameters()])
    g = torch.cat([x.reshape(-1) for x in grads])
    return {"seconds": time.perf_counter() - s, "grad": [float(x) for x in g]}


def _torchdiffeq(case: Case, rtol: float, atol: float, timeout: float) -> subprocess.Popen:
    args = [sys.executable, "-m", "benchmarks.stiff", "--torchdiffeq-child", case.name, str(rtol), str(atol)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)


def _torchdiffeq_result(proc: subprocess.Popen, ref: np.ndarray, n: int, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        if "non-finite" in last:
            return {"status": "NaN (torchdiffeq: non-finite values in state)"}
        return {"status": f"error: {last[:80]}"}
    res = json.loads(out.strip().splitlines()[-1])
    g = np.array(res["grad"])
    if not np.all(np.isfinite(g)):
        return {"status": "NaN gradient", "seconds": res["seconds"]}
    e0, ep = _errors(g, ref, n)
    return {"status": "ok", "seconds": res["seconds"], "err_y0": e0, "err_p": ep}


def run(quick: bool = False, timeout: float | None = None) -> list[dict]:
    """Time and gradient error of pnode, scipy Radau (forward) and torchdiffeq on both cases."""
    torch.set_num_threads(1)
    timeout = timeout if timeout is not None else (20.0 if quick else 60.0)
    repeats = 1 if quick else 5
    plans = [(ROBER, 1e-6, 1e-10, ("kencarp4",) if quick else ("kencarp4", "trapezoid")),
             (VDP, 1e-6, 1e-8, ("kencarp4",))]
    # torchdiffeq children start now and run alongside the first timings; they are given the
    # same tolerances as the first plan of their case
    procs = {c.name: _torchdiffeq(c, r, a, timeout) for c, r, a, _ in plans[:2]}
    started = time.perf_counter()
    rows = []
    refs = {}
    for case, rtol, atol, methods in plans:
        system, n = case.system(), len(case.y0)
        if case.name not in refs:
            refs[case.name] = reference_gradient(system, np.array(case.y0), np.array(case.t),
                                                 np.array(case.weights), case.ref_atol)[0]
        ref = refs[case.name]

        def radau(system=system, case=case, rtol=rtol, atol=atol):
            sol = solve_ivp(lambda _, y: system.f(y), (case.t[0], case.t[-1]), np.array(case.y0),
                            method="Radau", t_eval=np.array(case.t), rtol=rtol, atol=atol,
                            jac=lambda _, y: system.jac(y))
            if not sol.success:
                raise RuntimeError(sol.message)

        fns = {"radau": radau}
        for method in methods:
            fns[method] = (lambda case=case, method=method, rtol=rtol, atol=atol:
                           _pnode_gradient(case, method, rtol, atol))
        med = interleaved_medians(fns, repeats, clock=time.process_time)
        t_radau = med["radau"]
        for method in methods:
            g, stats = _pnode_gradient(case, method, rtol, atol)
            t_pnode = med[method]
            e0, ep = _errors(g, ref, n)
            rows.append({"case": case.name, "solver": f"pnode {method}", "rtol": rtol, "seconds": t_pnode,
                         "radau_seconds": t_radau, "ratio_to_radau": t_pnode / t_radau, "err_y0": e0,
                         "err_p": ep, "steps": stats.steps, "rhs_evals": stats.rhs_evals,
                         "status": "ok"})
        rows.append({"case": case.name, "solver": "scipy Radau (forward only)", "rtol": rtol,
                     "seconds": t_radau, "radau_seconds": t_radau, "ratio_to_radau": 1.0,
                     "status": "ok"})
    for case, rtol, _, _ in plans[:2]:
        left = max(timeout - (time.perf_counter() - started), 1.0)
        res = _torchdiffeq_result(procs[case.name], refs[case.name], len(case.y0), left)
        if res["status"].startswith("timeout"):
            res["status"] = f"timeout after {timeout:.0f} s"
        rows.append({"case": case.name, "solver": "torchdiffeq dopri5 adjoint", "rtol": rtol, **res})
    return rows


def goal(rows: list[dict]) -> dict:
    """ROBER goal: kencarp4 solve+gradient <= 10x Radau forward, gradient within 1e-3."""
    r = next(x for x in rows if x["case"] == "rober" and x["solver"] == "pnode kencarp4")
    err = max(r["err_y0"], r["err_p"])
    return {"ratio": r["ratio_to_radau"], "time_met": r["ratio_to_radau"] <= 10, "error": err,
            "error_met": err <= 1e-3}


def tables(rows: list[dict]) -> str:
    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    body = [[{"rober": "ROBER [0, 100]", "vdp": "Van der Pol mu=1000 [0, 0.75]"}[r["case"]], r["solver"],
             f"{r['rtol']:.0e}", fmt(r.get("seconds"), ".3f"), fmt(r.get("ratio_to_radau"), ".1f"),
             fmt(r.get("err_y0"), ".1e"), fmt(r.get("err_p"), ".1e"), r.get("steps", ""), r["status"]]
            for r in rows]
    g = goal(rows)
    time_status = "met" if g["time_met"] else f"missed by {g['ratio'] / 10:.1f}x"
    line = (f"ROBER goal (kencarp4 solve+gradient <= 10x Radau forward, error <= 1e-3): ratio "
            f"{g['ratio']:.1f} -> {time_status}; error {g['error']:.1e} -> "
            f"{'met' if g['error_met'] else 'missed'}")
    return "\n\n".join([
        "### 4. Stiff systems: solve + gradient vs scipy Radau forward-only\n\n"
        "Loss: weighted sum of the states at the output times (ROBER t = 1, 10, 100; Van der Pol "
        "t = 0.25, 0.5, 0.75); gradient with respect to y0 and the log-parameters. Errors are relative "
        "2-norms against forward sensitivities (scipy Radau, rtol 1e-12). 'x Radau' = time / Radau "
        "forward-only time at the same rtol/atol (Radau given the analytic Jacobian); seconds are CPU "
        "time, medians of round-robin repeats. torchdiffeq runs in a child process with a hard "
        "timeout, concurrently with the pnode timings.",
        md_table(["problem", "solver", "rtol", "seconds", "x Radau", "y0 grad err", "param grad err",
                  "steps", "status"], body),
        line,
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--torchdiffeq-child", nargs=3, metavar=("CASE", "RTOL", "ATOL"))
    args = ap.parse_args()
    if args.torchdiffeq_child:
        name, rtol, atol = args.torchdiffeq_child
        print(json.dumps(torchdiffeq_child(name, float(rtol), float(atol))))
        return
    print(tables(run(args.quick)))


if __name__ == "__main__":
    main()
