"""Limited-memory SR1 curvature in compact form ``B = gamma I + U diag(c) U^T``.

The symmetric rank-one update ``B+ = B + u u^T / (u^T s)``, ``u = y - B s``,
satisfies the secant condition ``B+ s = y`` and, unlike BFGS, may be indefinite,
which suits the non-convex training loss inside a trust region.  It is skipped
when ``|s^T u| < r ||s|| ||u||`` (Nocedal & Wright, *Numerical Optimization*,
2nd ed., Sec. 6.2), which keeps ``B`` bounded.  The ``m`` most recent pairs are
kept and ``B`` is rebuilt by applying the updates in order to ``gamma I``, which
yields the compact representation ``U diag(c) U^T`` used by the trust-region
subproblem solver (Brust, Erway & Marcia, "On solving L-SR1 trust-region
subproblems", Comput. Optim. Appl. 66, 2017).  RMTR keeps one such model per
level (Kopaničáková & Krause, SIAM J. Sci. Comput., 2023, Sec. 4).
"""

from __future__ import annotations

from collections import deque

import torch

__all__ = ["LSR1"]


class LSR1:
    """Limited-memory SR1 matrix with the safeguard that skips unsafe updates.

    Parameters
    ----------
    memory : int, default 5
        Number of ``(s, y)`` pairs kept.
    gamma : float, default 1.0
        Initial scaling ``B_0 = gamma I`` (adapted to ``y^T y / s^T y`` of the latest
        pair with ``s^T y > 0``, clipped to ``gamma_bounds``).
    r : float, default 1e-8
        Safeguard: skip the pair when ``|s^T (y - B s)| < r ||s|| ||y - B s||``.
    gamma_bounds : tuple of float
        Bounds on the adapted ``gamma``.

    Attributes
    ----------
    U : Tensor, shape ``[n, k]``
        Columns ``u_i`` of the compact representation (``k <= memory``).
    c : Tensor, shape ``[k]``
        Coefficients ``1 / (u_i^T s_i)``.
    skipped : int
        Pairs rejected by the safeguard so far.

    Examples
    --------
    >>> B = LSR1(memory=3)
    >>> B.update(s, y)      # True if accepted
    >>> B.matvec(v)         # B v
    """

    def __init__(self, memory: int = 5, gamma: float = 1.0, r: float = 1e-8,
                 gamma_bounds: tuple[float, float] = (1e-4, 1e4)) -> None:
        if not (isinstance(memory, int) and memory >= 1):
            raise ValueError(f"Invalid memory {memory!r}: pass a positive int")
        if not (gamma > 0):
            raise ValueError(f"Invalid gamma {gamma!r}: pass a positive number")
        if not (0 < r < 1):
            raise ValueError(f"Invalid r {r!r}: pass a number in (0, 1)")
        self.memory, self.gamma, self.r = memory, float(gamma), float(r)
        self.gamma_bounds = gamma_bounds
        self.pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=memory)
        self.U: torch.Tensor | None = None
        self.c: torch.Tensor | None = None
        self.skipped = 0
        self.n: int | None = None
        self.dtype = torch.float64

    def __len__(self) -> int:
        return 0 if self.c is None else int(self.c.numel())

    def reset(self) -> None:
        """Forget every pair (``B = gamma I``)."""
        self.pairs.clear()
        self.U = self.c = None

    def state_dict(self) -> dict:
        """Pairs, scaling and compact form (tensors and primitives), for exact resumption."""
        return {"memory": self.memory, "gamma": self.gamma, "skipped": self.skipped, "n": self.n,
                "pairs": [[s, y] for s, y in self.pairs], "U": self.U, "c": self.c}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the compact form is taken as saved, not rebuilt)."""
        if int(state["memory"]) != self.memory:
            raise ValueError(f"Invalid state: L-SR1 memory {state['memory']}, this one has {self.memory}")
        self.gamma, self.skipped, self.n = float(state["gamma"]), int(state["skipped"]), state["n"]
        self.pairs = deque(((s, y) for s, y in state["pairs"]), maxlen=self.memory)
        self.U, self.c = state["U"], state["c"]
        if self.pairs:
            self.dtype = self.pairs[0][0].dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``B v``."""
        out = self.gamma * v
        if self.U is not None:
            out = out + self.U @ (self.c * (self.U.T @ v))
        return out

    def dense(self) -> torch.Tensor:
        """``B`` as a dense matrix (for tests and small problems)."""
        if self.n is None:
            raise ValueError("dense() needs at least one update to know the dimension")
        B = self.gamma * torch.eye(self.n, dtype=self.dtype)
        if self.U is None:
            return B
        return B + self.U @ torch.diag(self.c) @ self.U.T

    def _unsafe(self, s: torch.Tensor, u: torch.Tensor) -> bool:
        return bool(abs(s @ u) < self.r * s.norm() * u.norm()) or bool(u.norm() == 0)

    def update(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Add the pair ``(s, y)`` unless the SR1 safeguard rejects it.

        Returns
        -------
        bool
            Whether the pair was accepted (``B s = y`` holds afterwards).
        """
        s, y = s.detach(), y.detach()
        self.n, self.dtype = s.numel(), s.dtype
        if not (torch.isfinite(s).all() and torch.isfinite(y).all()) or float(s.norm()) == 0.0:
            self.skipped += 1
            return False
        if self._unsafe(s, y - self.matvec(s)):
            self.skipped += 1
            return False
        saved = (list(self.pairs), self.gamma, self.U, self.c)
        sy = float(s @ y)
        if sy > 0:
            lo, hi = self.gamma_bounds
            self.gamma = min(max(float(y @ y) / sy, lo), hi)
        self.pairs.append((s.clone(), y.clone()))
        kept = self._rebuild()
        if not kept and float((self.matvec(s) - y).norm()) <= 1e-12 * float(y.norm()):
            # gamma alone now satisfies the secant condition (y parallel to s): nothing to store
            self.pairs.pop()
            self._rebuild()
            return True
        if not kept:
            # with the new gamma the pair became unsafe: keep the previous model
            self.pairs = deque(saved[0], maxlen=self.memory)
            self.gamma, self.U, self.c = saved[1], saved[2], saved[3]
            self.skipped += 1
            return False
        return True

    def _rebuild(self) -> bool:
        """Apply the stored updates in order to ``gamma I``; report whether the newest survived."""
        us, cs, newest_kept = [], [], False
        self.U = self.c = None
        last = len(self.pairs) - 1
        for i, (s, y) in enumerate(self.pairs):
            u = y - self.matvec(s)
            if self._unsafe(s, u):
                continue
            us.append(u)
            cs.append(1.0 / (s @ u))
            self.U, self.c = torch.stack(us, dim=1), torch.stack(cs)
            newest_kept = i == last
        return newest_kept
