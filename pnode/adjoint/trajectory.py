"""A fresh in-memory TSTrajectory configured directly, without a whole ``TSSetFromOptions``.

petsc4py has no TSTrajectory class, and ``TSSetFromOptions`` (the only way petsc4py
offers to configure a trajectory) re-reads every TS, TSAdapt, SNES and KSP option:
about a tenth of the fixed cost of a small training iteration.  Each forward solve
that keeps a trajectory makes a fresh one, so its three settings are applied here
through ctypes (as :mod:`.petsc_register` reaches PETSc's tableau registry), and
then ``TSTrajectorySetFromOptions``, so command-line ``-ts_trajectory_*`` options
still win.
"""

from __future__ import annotations

import ctypes
import functools

from petsc4py import PETSc

__all__ = ["configure_memory_trajectory"]


@functools.cache
def _lib():
    from .petsc_register import _library_path

    lib = ctypes.CDLL(_library_path())
    vp = ctypes.c_void_p
    lib.TSGetTrajectory.argtypes = [vp, ctypes.POINTER(vp)]
    lib.TSTrajectorySetType.argtypes = [vp, vp, ctypes.c_char_p]
    lib.TSTrajectorySetUseHistory.argtypes = [vp, ctypes.c_int]  # PetscBool is a C enum
    lib.TSTrajectorySetSolutionOnly.argtypes = [vp, ctypes.c_int]
    lib.TSTrajectorySetFromOptions.argtypes = [vp, vp]
    for fn in (lib.TSGetTrajectory, lib.TSTrajectorySetType, lib.TSTrajectorySetUseHistory,
               lib.TSTrajectorySetSolutionOnly, lib.TSTrajectorySetFromOptions):
        fn.restype = ctypes.c_int
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise PETSc.Error(code) if hasattr(PETSc, "Error") else RuntimeError(f"{what}: {code}")


def configure_memory_trajectory(ts: PETSc.TS, *, use_history: bool, solution_only: bool) -> bool:
    """Make the TS's trajectory (if it has one) a memory trajectory with these settings.

    Returns whether the TS has a trajectory.
    """
    lib = _lib()
    tj = ctypes.c_void_p()
    _check(lib.TSGetTrajectory(ts.handle, ctypes.byref(tj)), "TSGetTrajectory")
    if not tj.value:
        return False
    _check(lib.TSTrajectorySetType(tj, ts.handle, b"memory"), "TSTrajectorySetType")
    _check(lib.TSTrajectorySetUseHistory(tj, int(use_history)), "TSTrajectorySetUseHistory")
    _check(lib.TSTrajectorySetSolutionOnly(tj, int(solution_only)), "TSTrajectorySetSolutionOnly")
    _check(lib.TSTrajectorySetFromOptions(tj, ts.handle), "TSTrajectorySetFromOptions")
    return True
