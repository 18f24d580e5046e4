"""Hybrid stochastic–deterministic sampling: mini-batches that grow when progress stalls.

Training starts on small mini-batches (cheap, noisy steps far from a minimiser)
and doubles the batch whenever the mean batch loss of an epoch fails to drop by
a relative ``stall_tol`` below that of the previous epoch; once the batch holds
the whole training set, every iteration is deterministic and the trust-region
globalisation applies to the true loss.  This follows the hybrid
stochastic–deterministic scheme of Kopaničáková & Krause ("Globally convergent
multilevel training of deep residual networks", SIAM J. Sci. Comput., 2023) in
the spirit of dynamic sample-size methods (Byrd, Chin, Nocedal & Wu, Math.
Program. 134, 2012).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BatchSchedule"]


class BatchSchedule:
    """Draws mini-batches without replacement and grows the batch on stalls.

    Parameters
    ----------
    n_samples : int
        Size of the training set.
    batch_size : int or None
        Initial batch size (``None``: full batch, deterministic from the start).
    growth : float, default 2.0
        Factor applied to the batch size on a stall.
    stall_tol : float, default 0.05
        Relative decrease of the epoch-mean batch loss below which progress stalls.
    generator : torch.Generator, optional
        Source of the shuffles.

    Examples
    --------
    >>> sched = BatchSchedule(1000, 100)
    >>> idx = sched.next()          # indices of the next batch
    >>> sched.record(loss)          # batch loss after the step; may grow the batch
    """

    def __init__(self, n_samples: int, batch_size: int | None, *, growth: float = 2.0,
                 stall_tol: float = 0.05, generator: torch.Generator | None = None) -> None:
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"Invalid number of samples {n_samples!r}: the training set is empty; "
                             "pass at least one sample")
        if batch_size is None:
            batch_size = n_samples
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"Invalid batch_size {batch_size!r}: pass a positive int (or None for "
                             "full batch)")
        if not growth > 1:
            raise ValueError(f"Invalid batch_growth {growth!r}: pass a number > 1")
        if not stall_tol >= 0:
            raise ValueError(f"Invalid stall_tol {stall_tol!r}: pass a number >= 0")
        self.n, self.batch_size = n_samples, min(batch_size, n_samples)
        self.growth, self.stall_tol = float(growth), float(stall_tol)
        self.gen = generator
        self.epoch = 0
        self._perm = torch.randperm(self.n, generator=self.gen)
        self._pos = 0
        self._losses: list[float] = []
        self._previous: float | None = None

    @property
    def deterministic(self) -> bool:
        """Whether batches are the whole training set."""
        return self.batch_size >= self.n

    def state_dict(self) -> dict:
        """Batch size, epoch, position in the shuffle, stall statistics and the generator state."""
        return {"n": self.n, "batch_size": self.batch_size, "epoch": self.epoch, "perm": self._perm,
                "pos": self._pos, "losses": list(self._losses), "previous": self._previous,
                "generator": None if self.gen is None else self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: the next batches are those the saved schedule would draw."""
        if int(state["n"]) != self.n:
            raise ValueError(f"Invalid state: a schedule over {state['n']} samples, this one has {self.n}")
        self.batch_size, self.epoch = int(state["batch_size"]), int(state["epoch"])
        self._perm, self._pos = state["perm"].clone(), int(state["pos"])
        self._losses = [float(v) for v in state["losses"]]
        self._previous = None if state["previous"] is None else float(state["previous"])
        if state["generator"] is not None:
            if self.gen is None:
                self.gen = torch.Generator()
            self.gen.set_state(state["generator"])

    def next(self) -> torch.Tensor | None:
        """Indices of the next batch, or ``None`` for the full set (deterministic mode)."""
        if self.deterministic:
            return None
        if self._pos + self.batch_size > self.n:  # drop the ragged tail, reshuffle
            self._end_epoch()
            if self.deterministic:
                return None
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

    def record(self, batch_loss: float) -> None:
        """Record the batch loss after an iteration; full-batch iterations count as epochs."""
        if self.deterministic:
            self.epoch += 1
            return
        self._losses.append(float(batch_loss))

    def _end_epoch(self) -> None:
        self.epoch += 1
        mean = sum(self._losses) / max(len(self._losses), 1)
        if self._previous is not None and self._losses:
            if self._previous - mean < self.stall_tol * abs(self._previous):
                self.batch_size = min(self.n, int(math.ceil(self.batch_size * self.growth)))
                mean = math.inf  # compare the next epoch with nothing older than the growth
        self._previous = mean if math.isfinite(mean) else None
        self._losses = []
        self._perm = torch.randperm(self.n, generator=self.gen)
        self._pos = 0
