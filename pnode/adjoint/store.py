"""States stored by a schedule-driven adjoint sweep (binomial and disk checkpointing).

A :class:`StateStore` lives for one adjoint sweep: the schedule puts states in
RAM or in files of a private directory, takes them back, and :meth:`StateStore.close`
removes whatever is left, also when the sweep ends with an exception.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["StateStore"]


def _write_state(path: str, x: torch.Tensor) -> None:
    """Write a flat float64 state as raw bytes (read back with ``np.fromfile``)."""
    x.numpy().tofile(path)


class StateStore:
    """Checkpointed states of one adjoint sweep: in RAM, or as files in a private directory.

    Parameters
    ----------
    directory : str or None
        Parent of the private directory for states the schedule sends to disk
        (created on the first write, removed by :meth:`close`).

    Attributes
    ----------
    peak : int
        Largest number of states held at once (RAM and disk).
    disk_writes : int
        States written to files.
    """

    def __init__(self, directory: str | None) -> None:
        self.parent = directory
        self.ram: dict[int, torch.Tensor] = {}
        self.files: dict[int, str] = {}
        self.dir: str | None = None
        self.peak = 0
        self.disk_writes = 0

    def put(self, n: int, x: torch.Tensor, storage) -> None:
        """Store the state of step ``n`` in ``storage`` (a ``checkpoint_schedules.StorageType``)."""
        import checkpoint_schedules as cs

        if storage == cs.StorageType.DISK:
            path = self._write(n, x)
            self.files[n] = path
            self.disk_writes += 1
        else:
            self.ram[n] = x.clone()
        self.peak = max(self.peak, len(self.ram) + len(self.files))

    def get(self, n: int, storage, *, keep: bool) -> torch.Tensor:
        """The state of step ``n``; ``keep=False`` also forgets it (a schedule's ``Move``)."""
        import checkpoint_schedules as cs

        if storage != cs.StorageType.DISK:
            return self.ram[n].clone() if keep else self.ram.pop(n)
        path = self.files[n]
        x = torch.from_numpy(np.fromfile(path, dtype=np.float64))
        if not keep:
            os.remove(path)
            del self.files[n]
        return x

    def _write(self, n: int, x: torch.Tensor) -> str:
        if self.parent is None:
            raise AssertionError("internal: a RAM-only schedule asked for disk storage")
        try:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="pnode-checkpoints-", dir=self.parent)
            path = os.path.join(self.dir, f"state-{n}.f64")
            _write_state(path, x)
        except OSError as exc:
            raise CheckpointError(
                f"could not write a checkpoint to {self.parent!r}: {exc.strerror or exc}; free "
                "space there, choose another directory, or raise the RAM budget",
                directory=self.parent) from exc
        return path

    def close(self) -> None:
        """Forget the RAM states and remove the files (and the private directory)."""
        self.ram.clear()
        self.files.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
