"""torchdiffeq's ``ode_demo.py`` task (learn the cubic spiral), run on pnode unchanged.

The only pnode-specific line is the import: ``import pnode as torchdiffeq``.  A neural
ODE learns ``dy/dt = (y^3) A`` from one trajectory, trained on random short windows of
it, exactly the task of torchdiffeq's demo (written independently here).

Run: ``python examples/torchdiffeq/ode_demo.py --niters 200``.
"""

import argparse

import torch
from torch import nn

import pnode as torchdiffeq

parser = argparse.ArgumentParser("ode demo")
parser.add_argument("--method", default="dopri5")
parser.add_argument("--data_size", type=int, default=500)
parser.add_argument("--batch_time", type=int, default=10)
parser.add_argument("--batch_size", type=int, default=20)
parser.add_argument("--niters", type=int, default=400)
parser.add_argument("--adjoint", action="store_true")


class Lambda(nn.Module):
    """The true field of the spiral."""

    def __init__(self):
        super().__init__()
        self.A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)

    def forward(self, t, y):
        return torch.mm(y ** 3, self.A)


class ODEFunc(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2)).double()
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0, std=0.1)
                nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y ** 3)


def main(argv=None) -> float:
    """Train; return the final full-trajectory loss."""
    args = parser.parse_args(argv)
    odeint = torchdiffeq.odeint_adjoint if args.adjoint else torchdiffeq.odeint
    torch.manual_seed(0)
    true_y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0.0, 25.0, args.data_size, dtype=torch.float64)
    with torch.no_grad():
        true_y = torchdiffeq.odeint(Lambda(), true_y0, t, method="dopri5")

    def get_batch():
        s = torch.randperm(args.data_size - args.batch_time)[:args.batch_size]
        batch_y0 = true_y[s]  # (M, 1, D)
        batch_t = t[:args.batch_time]
        batch_y = torch.stack([true_y[s + i] for i in range(args.batch_time)], dim=0)
        return batch_y0, batch_t, batch_y

    func = ODEFunc()
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    for itr in range(1, args.niters + 1):
        optimizer.zero_grad()
        batch_y0, batch_t, batch_y = get_batch()
        pred_y = odeint(func, batch_y0, batch_t, method=args.method)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
        if itr % 100 == 0 or itr == args.niters:
            with torch.no_grad():
                pred_y = odeint(func, true_y0, t, method=args.method)
                total = float(torch.mean(torch.abs(pred_y - true_y)))
            print(f"Iter {itr:04d} | Total Loss {total:.6f}")
    return total


if __name__ == "__main__":
    main()
