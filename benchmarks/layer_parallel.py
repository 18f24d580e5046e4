"""Layer decomposition over MPI: a 2-block ODE model on 1 rank vs pipelined on 2 ranks.

Run: ``.venv/bin/python -m benchmarks.layer_parallel [--batch 2048] [--micro 4]``.
The model is ``p = 2`` ODE blocks (MLP 32-128-32 fields, RK4, 10 steps each,
on [0, 1/2] and [1/2, 1]); one rank trains both blocks in sequence, two ranks
hold one block each and run :class:`pnode.parallel.LayerParallel` with
``--micro`` micro-batches.  Median time per training step, speedup, bytes sent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def worker(batch: int, micro: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    import pnode
    from benchmarks.engine import mlp_field
    from pnode.parallel import LayerParallel

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.manual_seed(0)
    blocks = [pnode.NeuralODE(mlp_field(32, 128), t=(b / 2, (b + 1) / 2), method="rk4",
                              options={"step_size": 0.05}) for b in range(2)]
    x = torch.randn(batch, 32, dtype=torch.float64)
    y = torch.randn(batch, 32, dtype=torch.float64)
    if size == 1:
        def step():
            h = x
            for blk in blocks:
                h = blk(h)
            F.mse_loss(h, y).backward()
        sent = lambda: 0  # noqa: E731
    else:
        lp = LayerParallel(blocks[rank], comm, micro_batches=micro)

        def step():
            lp.train_step(x if rank == 0 else None, y if rank == size - 1 else None, F.mse_loss)
        sent = lambda: lp.sent_bytes  # noqa: E731
    step()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        s = time.perf_counter()
        step()
        comm.Barrier()
        times.append(time.perf_counter() - s)
    total_sent = comm.allreduce(sent())
    if rank == 0:
        print(json.dumps({"size": size, "time": statistics.median(times), "sent": total_sent}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.batch, args.micro, args.repeats)
        return
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("mpiexec not found: run from the venv (PATH=.venv/bin:$PATH)")
    res = {}
    for n in (1, 2):
        out = subprocess.run(
            [mpiexec, "-n", str(n), sys.executable, "-m", "benchmarks.layer_parallel", "--worker",
             "--batch", str(args.batch), "--micro", str(args.micro), "--repeats", str(args.repeats)],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
    t1, t2 = res[1]["time"], res[2]["time"]
    print(f"{os.cpu_count()} cores, {datetime.date.today()}; 2 ODE blocks (MLP 32-128-32, RK4 10 steps "
          f"each), batch {args.batch}, {args.micro} micro-batches\n")
    print("| ranks | s / step (median) | speedup | bytes sent per step |")
    print("|---|---|---|---|")
    print(f"| 1 (both blocks) | {t1:.4f} | 1.00 | 0 |")
    print(f"| 2 (pipeline) | {t2:.4f} | {t1 / t2:.2f} | {res[2]['sent'] / 1024:.0f} KiB |")
    k = args.micro
    print(f"\nGPipe bound for 2 stages and {k} micro-batches: {2 * k / (k + 1):.2f}x "
          "(the pipeline fill and drain idle one stage for one micro-batch each way).")


if __name__ == "__main__":
    main()
