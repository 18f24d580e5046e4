"""torchdiffeq's ``bouncing_ball.py`` task (events), run on pnode unchanged.

A ball falls under gravity and bounces with a learnable restitution coefficient;
each collision is found by ``odeint_event`` and the state is reset there.  The
collision times are differentiable with respect to the initial position, the
gravity and the restitution (implicit function theorem at each root), so the
parameters can be fitted to observed collision times.  Written independently for
pnode; the only pnode-specific line is ``import pnode as torchdiffeq``.

Run: ``python examples/torchdiffeq/bouncing_ball.py``.
"""

import argparse

import torch
from torch import nn

import pnode as torchdiffeq

parser = argparse.ArgumentParser("bouncing ball")
parser.add_argument("--bounces", type=int, default=5)
parser.add_argument("--niters", type=int, default=0, help="fit the restitution to the "
                    "collision times of a ball with restitution 0.7")
parser.add_argument("--adjoint", action="store_true")


class BouncingBall(nn.Module):
    def __init__(self, radius=0.2, gravity=9.8, restitution=0.5, adjoint=False):
        super().__init__()
        self.gravity = nn.Parameter(torch.as_tensor([gravity], dtype=torch.float64))
        self.log_radius = nn.Parameter(torch.log(torch.as_tensor([radius], dtype=torch.float64)))
        self.t0 = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
        self.init_pos = nn.Parameter(torch.tensor([10.0], dtype=torch.float64))
        self.init_vel = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
        self.absorption = nn.Parameter(torch.tensor([1 - restitution], dtype=torch.float64))
        self.odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

    def forward(self, t, state):
        pos, vel, log_radius = state
        dpos = vel
        dvel = -self.gravity
        return dpos, dvel, torch.zeros_like(log_radius)

    def event_fn(self, t, state):
        # positive while the ball is above the ground
        pos, _, log_radius = state
        return pos - torch.exp(log_radius)

    def get_initial_state(self):
        state = (self.init_pos, self.init_vel, self.log_radius)
        return self.t0, state

    def state_update(self, state):
        """Reflect the velocity, losing a fraction of it to absorption."""
        pos, vel, log_radius = state
        pos = pos + 1e-7  # leave the event surface, so the next search starts off it
        vel = -vel * (1 - self.absorption)
        return (pos, vel, log_radius)

    def get_collision_times(self, nbounces=1):
        event_times = []
        t0, state = self.get_initial_state()
        for _ in range(nbounces):
            event_t, solution = torchdiffeq.odeint_event(
                self, state, t0, event_fn=self.event_fn, reverse_time=False, atol=1e-8,
                rtol=1e-8, odeint_interface=self.odeint)
            event_times.append(event_t)
            state = self.state_update(tuple(s[-1] for s in solution))
            t0 = event_t
        return event_times

    def simulate(self, nbounces=1):
        event_times = self.get_collision_times(nbounces)
        t0, state = self.get_initial_state()
        trajectory = [state[0][None]]
        times = [t0.reshape(-1)]
        for event_t in event_times:
            tt = torch.linspace(float(t0.detach()), float(event_t.detach()), 20,
                                dtype=torch.float64)[1:-1]
            tt = torch.cat([t0.reshape(-1), tt, event_t.reshape(-1)])
            solution = self.odeint(self, state, tt, atol=1e-8, rtol=1e-8)
            trajectory.append(solution[0][1:])
            times.append(tt[1:])
            state = self.state_update(tuple(s[-1] for s in solution))
            t0 = event_t
        return torch.cat(times), torch.cat(trajectory, dim=0).reshape(-1), event_times


def main(argv=None):
    """Simulate (and optionally fit); return the collision times and the gradients."""
    args = parser.parse_args(argv)
    system = BouncingBall(adjoint=args.adjoint)
    times, trajectory, event_times = system.simulate(nbounces=args.bounces)
    print("collision times:", [round(float(e.detach()), 6) for e in event_times])
    grads = torch.autograd.grad(event_times[-1].sum(), [system.init_pos, system.gravity,
                                                        system.absorption])
    print("d t_last / d (init_pos, gravity, absorption):", [float(g.detach()) for g in grads])
    if args.niters:
        target = [e.detach() for e in BouncingBall(restitution=0.7).get_collision_times(3)]
        opt = torch.optim.Adam([system.absorption], lr=0.05)
        for _ in range(args.niters):
            opt.zero_grad()
            pred = system.get_collision_times(3)
            loss = sum((p - q).pow(2).sum() for p, q in zip(pred, target, strict=True))
            loss.backward()
            opt.step()
        print("fitted restitution:", float(1 - system.absorption.detach()))
    return event_times, grads, system


if __name__ == "__main__":
    main()
