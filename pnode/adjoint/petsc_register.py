"""PETSc's tableau registry, reached through ctypes.

petsc4py 3.26 exposes neither ``TSRKGetTableau`` (read the coefficients of a
TSRK type) nor ``TSRKRegister`` / ``TSARKIMEXRegister`` (add a new tableau), so
this module calls them in ``libpetsc`` directly: the library petsc4py already
loaded into the process (found in ``/proc/self/maps``, else at
``petsc4py.get_config()``'s ``PETSC_DIR/PETSC_ARCH/lib``), so that the tableau
list it changes is the one ``TSRKSetType`` searches.  A TS is passed as
petsc4py's ``ts.handle`` (the C pointer).

A tableau registered here runs through PETSc's own TSRK (or TSARKIMEX), so its
adjoint is PETSc's ``TSAdjointStep`` for that type, as exact as for PETSc's
built-in tableaux.  Registration is per process, once per name; under MPI every
rank registers the same tableaux because every rank builds the same solvers.
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import cache, lru_cache

import numpy as np

from .tableau import ButcherTableau

__all__ = ["rk_tableau", "register_rk", "register_dirk"]

_lock = threading.Lock()
_registered: dict[tuple[str, str], ButcherTableau] = {}  # (family, name) -> tableau


def _petsc():
    from .._petsc import init_petsc

    init_petsc()
    from petsc4py import PETSc

    return PETSc


def _library_path() -> str:
    # the copy already mapped into this process, so that we share its static tableau lists
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libpetsc.so"):
                    return path
    except OSError:
        pass
    import petsc4py

    cfg = petsc4py.get_config()
    libdir = os.path.join(cfg["PETSC_DIR"], cfg.get("PETSC_ARCH") or "", "lib")
    for name in sorted(os.listdir(libdir)):
        if name.startswith("libpetsc.") and (".so" in name or name.endswith(".dylib")):
            return os.path.join(libdir, name)
    raise RuntimeError(f"libpetsc not found in {libdir}")


@lru_cache(maxsize=1)
def _lib():
    PETSc = _petsc()
    if np.dtype(PETSc.RealType) != np.float64 or np.dtype(PETSc.ScalarType).kind != "f":
        raise RuntimeError("pnode's tableaux need PETSc built with real double precision")
    lib = ctypes.CDLL(_library_path())
    real = ctypes.c_double
    Int = ctypes.c_int64 if np.dtype(PETSc.IntType).itemsize == 8 else ctypes.c_int32
    preal, pInt = ctypes.POINTER(real), ctypes.POINTER(Int)
    ppreal = ctypes.POINTER(preal)
    lib.TSRKGetTableau.argtypes = [ctypes.c_void_p, pInt, ppreal, ppreal, ppreal, ppreal, pInt,
                                   ppreal, ctypes.POINTER(ctypes.c_int)]
    lib.TSRKGetOrder.argtypes = [ctypes.c_void_p, pInt]
    lib.TSRKRegister.argtypes = [ctypes.c_char_p, Int, Int, preal, preal, preal, preal, Int, preal]
    lib.TSARKIMEXRegister.argtypes = [ctypes.c_char_p, Int, Int, preal, preal, preal, preal, preal,
                                      preal, preal, preal, Int, preal, preal]
    for fn in (lib.TSRKGetTableau, lib.TSRKGetOrder, lib.TSRKRegister, lib.TSARKIMEXRegister):
        fn.restype = ctypes.c_int
    lib.Int, lib.preal = Int, preal
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"PETSc error {code} in {what}")


def _array(values):
    if values is None:
        return None
    return (ctypes.c_double * len(values))(*values)


def _copy(ptr, n: int) -> list[float] | None:
    return None if not ptr else [float(ptr[i]) for i in range(n)]


@cache
def rk_tableau(subtype: str) -> ButcherTableau:
    """The Butcher tableau of a PETSc TSRK type, as PETSc stores it.

    Parameters
    ----------
    subtype : str
        A ``TSRKType`` (``"5dp"``, ``"8vr"``, ...), built in or registered.

    Returns
    -------
    ButcherTableau
        PETSc's ``A``, ``b``, ``c`` and embedded weights, with PETSc's order.

    Raises
    ------
    ValueError
        If PETSc has no TSRK type of that name.
    """
    PETSc = _petsc()
    lib = _lib()
    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    try:
        ts.setType("rk")
        try:
            ts.setRKType(subtype)
        except PETSc.Error:
            raise ValueError(f"PETSc has no RK tableau named {subtype!r}") from None
        s, p, order, fsal = lib.Int(), lib.Int(), lib.Int(), ctypes.c_int()
        A, b, c, be, bi = (lib.preal() for _ in range(5))
        _check(lib.TSRKGetTableau(ts.handle, ctypes.byref(s), ctypes.byref(A), ctypes.byref(b),
                                  ctypes.byref(c), ctypes.byref(be), ctypes.byref(p),
                                  ctypes.byref(bi), ctypes.byref(fsal)), "TSRKGetTableau")
        _check(lib.TSRKGetOrder(ts.handle, ctypes.byref(order)), "TSRKGetOrder")
        n = s.value
        flat = _copy(A, n * n)
        tab = ButcherTableau(A=[flat[i * n:(i + 1) * n] for i in range(n)], b=_copy(b, n),
                             c=_copy(c, n), b_embedded=_copy(be, n), order=order.value)
    finally:
        ts.destroy()
    if tab.fsal != bool(fsal.value):  # our derivation must agree with PETSc's
        raise RuntimeError(f"TSRK {subtype!r}: PETSc's FSAL flag {bool(fsal.value)} "
                           f"disagrees with the tableau's {tab.fsal}")
    return tab


def _claim(family: str, name: str, tableau: ButcherTableau) -> bool:
    """Whether ``name`` still has to be registered (False: already done, same tableau)."""
    known = _registered.get((family, name))
    if known is None:
        return True
    if known != tableau:
        raise ValueError(f"a different {family} tableau is already registered as {name!r}")
    return False


def register_rk(name: str, tableau: ButcherTableau) -> None:
    """Register an explicit tableau with PETSc as the TSRK type ``name`` (once per process).

    Parameters
    ----------
    name : str
        The new ``TSRKType``; ``ts.setRKType(name)`` selects it afterwards.
    tableau : ButcherTableau
        An explicit tableau.

    Raises
    ------
    ValueError
        If the tableau is not explicit, or another tableau already has that name.
    """
    if not tableau.explicit:
        raise ValueError(f"TSRK {name!r}: TSRK integrates explicit tableaux only")
    with _lock:
        if not _claim("rk", name, tableau):
            return
        lib = _lib()
        A, b, c, be = tableau.flat()
        # p = 1 with binterp = b: PETSc's linear interpolant (pnode never interpolates;
        # output times are step boundaries)
        _check(lib.TSRKRegister(name.encode(), tableau.order, tableau.stages, _array(A),
                                _array(b), _array(c), _array(be), 1, _array(b)), "TSRKRegister")
        _registered[("rk", name)] = tableau


def register_dirk(name: str, tableau: ButcherTableau) -> None:
    """Register a diagonally implicit tableau as the TSARKIMEX type ``name`` (once per process).

    The tableau becomes the implicit part of an additive scheme whose explicit part
    is never used: the engine runs fully implicit ARKIMEX schemes with a zero
    explicit right-hand side (see :class:`pnode.adjoint.build.TSObjects`), so the
    stages solve ``Y_i = y + h sum_j A[i][j] f(Y_j)`` and PETSc's ARKIMEX adjoint
    applies unchanged.

    Parameters
    ----------
    name : str
        The new ``TSARKIMEXType``.
    tableau : ButcherTableau
        A lower-triangular tableau with at least one nonzero diagonal entry.

    Raises
    ------
    ValueError
        If the tableau is explicit, or another tableau already has that name.
    """
    if tableau.explicit:
        raise ValueError(f"TSARKIMEX {name!r}: an explicit tableau belongs to TSRK "
                         "(register_rk)")
    with _lock:
        if not _claim("arkimex", name, tableau):
            return
        lib = _lib()
        At, bt, ct, bet = tableau.flat()
        s = tableau.stages
        zeros = [0.0] * (s * s)
        # explicit table: zero (the explicit right-hand side is identically zero)
        _check(lib.TSARKIMEXRegister(name.encode(), tableau.order, s, _array(At), _array(bt),
                                     _array(ct), _array(zeros), _array([0.0] * s), _array(ct),
                                     _array(bet), _array(None if bet is None else [0.0] * s),
                                     1, _array(bt), _array([0.0] * s)), "TSARKIMEXRegister")
        _registered[("arkimex", name)] = tableau
