"""What ``pnode run`` needs to train one example on every rank of an MPI job.

The runner keeps one :class:`RunComm`: the job's communicator (or none for a
serial run), the rank-0-only rules for files and printing, the broadcast of a
checkpoint read on rank 0, and the per-iteration agreement that makes every
rank stop together (an interrupt, a planned stop or a failure on any rank).

A failure that leaves the other ranks inside a collective operation (an
exception raised between two collective solves on one rank only) cannot be
reached by any agreement: the failing rank prints its message and, when the
others have not joined the agreement within :data:`ABORT_AFTER` seconds, ends
the job with ``MPI_Abort``, which is what a batch scheduler expects anyway.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["RunComm", "StopRequest", "ABORT_AFTER"]

#: seconds a failing rank waits for the others to reach the agreement before MPI_Abort
ABORT_AFTER = 10.0

# agreement codes, combined with MAX: the most severe wins on every rank
_OK, _STOP, _FAILED = 0, 1, 2


class StopRequest:
    """Deferred SIGINT / SIGTERM: the first one asks the run to stop after the current iteration.

    A second signal of either kind raises :class:`KeyboardInterrupt` at once (the run is
    then not checkpointed beyond its last consistent state).  Installed only in the main
    thread; elsewhere signals keep their previous meaning.
    """

    def __init__(self) -> None:
        self.count = 0
        self.signal_name: str | None = None
        self._saved: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.signal_name = signal.Signals(signum).name
        if self.count > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._saved[s] = signal.getsignal(s)
                # replaces PETSc's C handler too, so SIGTERM no longer ends in MPI_Abort
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._saved.clear()


class RunComm:
    """The communicator of one ``pnode run`` (``COMM_WORLD``; serial when it has one rank).

    Attributes
    ----------
    comm : mpi4py.MPI.Comm or None
        ``None`` for a one-rank job: nothing is communicated.
    rank, size : int
    """

    def __init__(self, comm: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.comm = comm if self.size > 1 else None

    @property
    def root(self) -> bool:
        """Whether this rank writes files and prints."""
        return self.rank == 0

    # -- rank 0 does, everyone learns the outcome -----------------------------------------
    def on_root(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; return its result on every rank, or raise its exception there.

        The exception is re-raised on every rank with the same type and message, so
        that a bad option or checkpoint ends the whole job in the same way.
        """
        if self.comm is None:
            return fn()
        result, error = None, None
        if self.root:
            try:
                result = fn()
            except Exception as e:  # carried to the other ranks, then raised everywhere
                error = e
        result, error = self.comm.bcast((result, error) if self.root else None, root=0)
        if error is not None:
            raise error
        return result

    def sum(self, value: float) -> float:
        """Sum of a float over ranks (in rank order on every rank: identical results)."""
        if self.comm is None:
            return float(value)
        return float(sum(self.comm.allgather(float(value))))

    # -- the per-iteration agreement ----------------------------------------------------------
    def agree(self, stop: bool, error: BaseException | None) -> tuple[bool, str | None]:
        """Agree on whether to go on; returns ``(stop, failure message or None)`` on every rank.

        A rank with ``error`` contributes its message; when some other rank is stuck in a
        different collective operation, the failing rank aborts the job after
        :data:`ABORT_AFTER` seconds with that message on stderr.
        """
        code = _FAILED if error is not None else (_STOP if stop else _OK)
        if self.comm is None:
            return code != _OK, _message(error) if error is not None else None
        with self._watchdog(error):
            codes = self.comm.allgather((code, _message(error) if error is not None else None))
        worst = max(c for c, _ in codes)
        if worst == _FAILED:
            rank, msg = next((r, m) for r, (c, m) in enumerate(codes) if c == _FAILED)
            return True, f"rank {rank} of {self.size}: {msg}"
        return worst == _STOP, None

    @contextmanager
    def _watchdog(self, error: BaseException | None) -> Iterator[None]:
        if error is None or self.comm is None:
            yield
            return
        done = threading.Event()
        comm, rank, size = self.comm, self.rank, self.size

        def abort() -> None:
            if not done.wait(ABORT_AFTER):
                print(f"pnode run: rank {rank} of {size} failed while the other ranks wait in a "
                      f"collective operation; aborting the job: {_message(error)}",
                      file=sys.stderr, flush=True)
                comm.Abort(1)

        threading.Thread(target=abort, daemon=True).start()
        try:
            yield
        finally:
            done.set()


def _message(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
