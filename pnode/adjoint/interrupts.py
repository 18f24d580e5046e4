"""SIGTERM during a sweep that writes checkpoint files: remove them, then terminate as usual.

Python's default action for SIGTERM (what a batch scheduler sends at a time
limit) ends the process at once, which would leave a disk-checkpointed adjoint
sweep's files behind.  While such a sweep runs, and only if the application has
not installed a SIGTERM handler of its own, :func:`files_removed_on_sigterm`
turns SIGTERM into an exception; the sweep's clean-up removes the files, and the
signal is then delivered again with the default action, so the process still
ends by SIGTERM (exit status -15 / 143), exactly as it would have.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["files_removed_on_sigterm"]


class _Terminated(BaseException):
    """SIGTERM arrived during a sweep with checkpoint files (internal)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated("SIGTERM")


@contextmanager
def files_removed_on_sigterm(active: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM unwinds (running clean-ups) before ending the process."""
    if not active or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # the application's own handler (e.g. pnode run's) stays in charge
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    terminated = False
    try:
        yield
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if terminated:
        os.kill(os.getpid(), signal.SIGTERM)  # the default action: the process ends here
