"""``pnode run digits`` and ``pnode run rmtr`` on 1 and 2 MPI ranks: time per epoch, communication.

Run: ``.venv/bin/python -m benchmarks.rmtr_mpi [--digits-iters 60] [--rmtr-iters 30]`` (a few
minutes).  The driver launches ``mpiexec -n 1`` and ``-n 2`` runs of this module (worker mode);
each trains both examples through :func:`pnode.examples.runner.run_example` (rank-0 I/O,
per-iteration agreement, everything ``mpirun -n N pnode run`` does) and reports

- the training time per epoch: ``digits`` (its default configuration: width 32, MLP field
  32-64-32, 4 RK4 steps) draws mini-batches of 128 from 1438 images
  (1438 / 128 iterations per epoch); ``rmtr`` is full batch (one V-cycle or nested step per
  iteration; depth 32, width 16, 3 levels, F-cycle);
- the communication of one iteration: every collective call pnode makes from Python on the
  job's communicator (counted by a subclass of ``MPI.Intracomm`` passed as ``comm=``; bytes of
  buffers, or of the pickled objects for the lower-case mpi4py calls), and the messages and
  reductions PETSc makes inside its solvers (its ``-log_view`` stage summary of the training
  iterations);
- a 64-rank estimate: one rank's measured time on a 1/64 shard of the work plus the measured
  per-iteration collectives at an HPC interconnect's cost (2 us latency per ``log2 p`` tree
  level, 10 GB/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, N_DIGITS = 128, 1438


def _counting_comm():
    from mpi4py import MPI

    class Counting(MPI.Intracomm):
        """COMM_WORLD, counting the collectives called on it from Python."""

        calls: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        seconds = [0.0]  # inside the collectives (waiting for the slowest rank included)

        def _count(self, name: str, size: int, call):
            Counting.calls[name] = Counting.calls.get(name, 0) + 1
            Counting.nbytes[name] = Counting.nbytes.get(name, 0) + int(size)
            t0 = time.perf_counter()
            try:
                return call()
            finally:
                Counting.seconds[0] += time.perf_counter() - t0

        def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):  # noqa: N802 (mpi4py's name)
            return self._count("Allreduce", memoryview(recvbuf).nbytes,
                               lambda: super(Counting, self).Allreduce(sendbuf, recvbuf, op))

        def Bcast(self, buf, root=0):  # noqa: N802
            return self._count("Bcast", memoryview(buf).nbytes,
                               lambda: super(Counting, self).Bcast(buf, root))

        def allgather(self, obj):
            return self._count("allgather", len(pickle.dumps(obj)),
                               lambda: super(Counting, self).allgather(obj))

        def allreduce(self, obj, op=MPI.SUM):
            return self._count("allreduce", len(pickle.dumps(obj)),
                               lambda: super(Counting, self).allreduce(obj, op))

        def bcast(self, obj, root=0):
            size = len(pickle.dumps(obj)) if self.Get_rank() == root else 0
            return self._count("bcast", size, lambda: super(Counting, self).bcast(obj, root))

    # petsc4py converts only mpi4py's own communicator types: give PETSc a plain handle of the
    # same communicator and keep the counted one for pnode's own collectives
    from pnode.adjoint import distributed

    init = distributed.Distributed.__init__

    def counted_init(self, comm):
        init(self, MPI.Intracomm(comm))
        self.comm = comm

    distributed.Distributed.__init__ = counted_init
    return Counting(MPI.COMM_WORLD), Counting


def _petsc_stage(log: str, name: str) -> dict[str, float]:
    """Messages, message length and reductions of one stage from PETSc's -log_view summary."""
    for line in log.splitlines():
        m = re.match(rf"\s*\d+:\s+{name}:\s+(.*)", line)
        if m:
            v = [float(x.rstrip("%")) for x in m.group(1).split()]
            # time %, flop %, messages %, avg length %, reductions %
            return {"messages": v[4], "message_length": v[6], "reductions": v[8]}
    return {"messages": math.nan, "message_length": math.nan, "reductions": math.nan}


def worker(name: str, iters: int, argv: list[str]) -> None:
    import torch
    from petsc4py import PETSc

    from pnode.examples import EXAMPLES
    from pnode.examples.runner import run_example

    torch.set_num_threads(1)
    comm, counter = _counting_comm()
    cls = EXAMPLES[name]
    PETSc.Log.begin()
    stage = PETSc.Log.Stage("training")
    step = cls.train_step
    marks: list[tuple[dict, dict, float]] = []  # the counters as each iteration starts

    def staged(self, iteration):
        marks.append((dict(counter.calls), dict(counter.nbytes), counter.seconds[0]))
        stage.push()
        try:
            return step(self, iteration)
        finally:
            stage.pop()

    cls.train_step = staged
    root = comm.Get_rank() == 0
    out = Path(comm.bcast(tempfile.mkdtemp(prefix="pnode-bench-") if root else None))
    res = run_example(cls, ["--no-progress", "--overwrite", "--out", str(out / name),
                            "--iters", str(iters), *argv], comm=comm)
    cls.train_step = step
    log_path = out / "log.txt"
    PETSc.Log.view(PETSc.Viewer.ASCII(str(log_path), comm=PETSc.COMM_WORLD))
    if not root:
        return
    petsc = _petsc_stage(log_path.read_text(), "training")
    shutil.rmtree(out, ignore_errors=True)
    n = res.metrics["iterations"]
    # whole iterations (the step and the runner's agreement after it): first start to last start
    (c0, b0, s0), (c1, b1, s1), k = marks[0], marks[-1], max(len(marks) - 1, 1)
    per_calls = {key: (c1.get(key, 0) - c0.get(key, 0)) / k for key in c1}
    per_bytes = {key: (b1.get(key, 0) - b0.get(key, 0)) / k for key in b1}
    print(json.dumps({
        "example": name, "size": comm.Get_size(), "iterations": n,
        "train_seconds": res.metrics["train_seconds"], "final_loss": res.metrics["final_loss"],
        "python_calls_per_iteration": per_calls, "python_bytes_per_iteration": per_bytes,
        "collective_seconds_per_iteration": (s1 - s0) / k,
        "petsc_per_iteration": {k: (v / n if k != "message_length" else v) for k, v in petsc.items()},
    }))


def _run(mpiexec: str, n: int, name: str, iters: int, argv: list[str]) -> dict:
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "benchmarks.rmtr_mpi", "--worker", name,
           "--iters", str(iters), "--", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _estimate_64(t_shard: float, calls: float, nbytes: float) -> float:
    """One rank's time on its 1/64 shard plus the per-iteration collectives at p = 64."""
    latency, bandwidth, levels = 2e-6, 10e9, math.log2(64)
    return t_shard + calls * 2 * levels * latency + 2 * 63 / 64 * nbytes / bandwidth


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits-iters", type=int, default=60)
    ap.add_argument("--rmtr-iters", type=int, default=30)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.iters, args.rest)
        return
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("mpiexec not found: run from the venv (PATH=.venv/bin:$PATH)")
    # the third entry: the example on one rank with a 1/64 shard of the work (digits: 2 of the
    # 128 images per batch; rmtr: 22 of the 1347 training images), for the 64-rank estimate
    cases = {"digits": (args.digits_iters, [], ["--batch", "2"]),
             "rmtr": (args.rmtr_iters, ["--depth", "32", "--levels", "3", "--width", "16"],
                      ["--test-fraction", "0.9878"])}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, one torch thread per rank\n")
    print("| example | ranks | s / epoch | speedup | collectives / iteration (Python) "
          "| bytes / iteration | s / it in collectives | PETSc reductions / it "
          "| 64-rank estimate s / epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (iters, extra, shard) in cases.items():
        per_epoch, per_it = {}, {}
        epoch = N_DIGITS / BATCH if name == "digits" else 1.0  # iterations per epoch
        for n, flags in ((1, extra), (2, extra), (64, extra + shard)):
            r = _run(mpiexec, 1 if n == 64 else n, name, iters, flags)
            per_it[n] = r["train_seconds"] / r["iterations"]
            per_epoch[n] = per_it[n] * epoch
            if n == 64:
                break
            calls = sum(r["python_calls_per_iteration"].values())
            nbytes = sum(r["python_bytes_per_iteration"].values())
            kinds = ", ".join(f"{v:.1f} {k}" for k, v in sorted(r["python_calls_per_iteration"].items()) if v)
            row = (f"| {name} | {n} | {per_epoch[n]:.3f} | {per_epoch[1] / per_epoch[n]:.2f} "
                   f"| {calls:.1f} ({kinds or 'none'}) | {nbytes:.0f} "
                   f"| {r['collective_seconds_per_iteration']:.4f} "
                   f"| {r['petsc_per_iteration']['reductions']:.1f}")
            if n == 2:
                last = (row, calls, nbytes)
            else:
                print(row + " | |", flush=True)
        row, calls, nbytes = last
        t64 = _estimate_64(per_it[64], calls, nbytes) * epoch
        print(f"{row} | {t64:.4f} ({per_epoch[1] / t64:.1f}x; one rank on a 1/64 shard: "
              f"{per_it[64]:.4f} s / it) |", flush=True)
    print("\n64-rank estimate: one rank's measured time per iteration on a 1/64 shard + the measured "
          "collectives of one iteration at an HPC interconnect's cost (2 log2(64) latencies of 2 us each, "
          "2 x bytes at 10 GB/s).  PETSc's reductions inside the solves are a few per solve at most "
          "(none for fixed steps) and are left out.")


if __name__ == "__main__":
    main()
