"""Data-parallel training of an ODE-block classifier with MPI.

    mpirun -n 4 .venv/bin/python examples/mpi_data_parallel.py --epochs 20
    # on a cluster:  srun -n 64 python examples/mpi_data_parallel.py -pnode_ts_monitor

Each rank holds a shard of scikit-learn's bundled digits (no download); the ODE
block integrates every rank's shard on one distributed PETSc Vec (the same
steps as a serial run), and every rank ends each step with identical
parameters.  PETSc options on the command line (``-pnode_*``) reach the solver.
"""

from __future__ import annotations

import argparse

import torch
from mpi4py import MPI
from sklearn.datasets import load_digits

import pnode
from pnode.parallel import DataParallel


class Field(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(),
                                       torch.nn.Linear(width, width))

    def forward(self, t, y):
        return self.net(y)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train; return the first and last training loss and the test accuracy."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    args, _ = ap.parse_known_args(argv)  # the rest are PETSc options
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    n_train = int(0.8 * len(X))
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.width),
        pnode.NeuralODE(Field(args.width), method="rk4", options={"step_size": 0.25}, comm=comm),
        torch.nn.Linear(args.width, 10)).double()
    dp = DataParallel(model, comm, seed=0)
    x_tr, y_tr = dp.shard(X[:n_train]), dp.shard(y[:n_train])
    n_global = dp.global_count(len(x_tr))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for epoch in range(1, args.epochs + 1):
        opt.zero_grad()
        # each rank's share of the global mean loss: summed gradients = the serial gradient
        loss = torch.nn.functional.cross_entropy(model(x_tr), y_tr, reduction="sum") / n_global
        loss.backward()
        dp.reduce_gradients()
        opt.step()
        total = comm.allreduce(float(loss.detach()))
        losses.append(total)
        dp.log(f"epoch {epoch:3d}  train loss {total:.4f}")
    with torch.no_grad():
        x_te, y_te = dp.shard(X[n_train:]), dp.shard(y[n_train:])
        correct = comm.allreduce(int((model(x_te).argmax(1) == y_te).sum()))
    accuracy = correct / (len(X) - n_train)
    dp.log(f"test accuracy {accuracy:.3f} on {comm.Get_size()} ranks")
    return {"first_loss": losses[0], "last_loss": losses[-1], "accuracy": accuracy}


if __name__ == "__main__":
    main()
