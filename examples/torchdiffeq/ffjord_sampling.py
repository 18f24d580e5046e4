"""FFJORD-style continuous normalizing flow: density by forward time, sampling by reverse time.

The flow maps data ``x`` at ``t=0`` to latent ``z`` at ``t=T`` with the change of
log-density ``d log p / dt = -tr(df/dz)`` integrated alongside; sampling integrates
the same field from ``T`` back to 0 with a decreasing ``t``, as FFJORD does with
torchdiffeq.  The only pnode-specific line is ``import pnode as torchdiffeq``;
written independently for pnode.

Run: ``python examples/torchdiffeq/ffjord_sampling.py --niters 100``.
"""

import argparse
import math

import torch
from torch import nn

import pnode as torchdiffeq

parser = argparse.ArgumentParser("ffjord sampling")
parser.add_argument("--niters", type=int, default=200)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--adjoint", action="store_true")


class CNFField(nn.Module):
    """``d(z, logp)/dt = (f(t, z), -tr(df/dz))`` with the exact trace (2-D data)."""

    def __init__(self, dim=2, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, dim)).double()

    def forward(self, t, state):
        z, _ = state
        with torch.enable_grad():
            z = z.requires_grad_(True) if not z.requires_grad else z
            tt = torch.ones_like(z[:, :1]) * t
            dz = self.net(torch.cat([z, tt], dim=1))
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                        for i in range(z.shape[1]))
        return dz, -trace.unsqueeze(1)


def sample_data(n, generator):
    """Two moons-like ring data."""
    theta = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    r = 2.0 + 0.2 * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)


def log_normal(z):
    return -0.5 * (z ** 2).sum(1, keepdim=True) - z.shape[1] * 0.5 * math.log(2 * math.pi)


def main(argv=None):
    """Train by maximum likelihood; sample by reverse time; return (losses, samples, field)."""
    args = parser.parse_args(argv)
    odeint = torchdiffeq.odeint_adjoint if args.adjoint else torchdiffeq.odeint
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    field = CNFField()
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    t_fwd = torch.tensor([0.0, 1.0], dtype=torch.float64)
    losses = []
    for itr in range(args.niters):
        opt.zero_grad()
        x = sample_data(args.batch, gen)
        logp0 = torch.zeros(args.batch, 1, dtype=torch.float64)
        z, dlogp = odeint(field, (x, logp0), t_fwd, method="dopri5", rtol=1e-5, atol=1e-7)
        loss = -(log_normal(z[-1]) - dlogp[-1]).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if itr % 50 == 0:
            print(f"iter {itr:4d} | nll {loss.item():.4f}")
    # sampling: from the base density at t = 1 back to t = 0 (a decreasing t)
    with torch.no_grad():
        z = torch.randn(args.batch, 2, generator=gen, dtype=torch.float64)
        x, _ = odeint(field, (z, torch.zeros(args.batch, 1, dtype=torch.float64)),
                      t_fwd.flip(0), method="dopri5", rtol=1e-7, atol=1e-9)
    samples = x[-1]
    print("sample radius mean:", float(samples.norm(dim=1).mean()))
    return losses, samples, z, field


if __name__ == "__main__":
    main()
