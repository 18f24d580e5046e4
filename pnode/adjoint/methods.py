"""Method names and the PETSc time integrators behind them.

One table maps every user-facing method name (torchdiffeq's names included) to
a PETSc ``TS`` type and subtype together with the properties the engine needs:
order, whether steps adapt, whether stages are implicit, whether an IMEX split
is accepted.  Only schemes for which PETSc 3.26 implements ``TSAdjoint`` are
listed (TSRK, TSTHETA, TSARKIMEX); methods outside that set are rejected with
a message that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Method", "resolve_method", "methods", "NO_ADJOINT"]


@dataclass(frozen=True)
class Method:
    """A time-integration scheme as the engine sees it.

    Attributes
    ----------
    name : str
        The name users pass as ``method=``.
    ts_type : str
        PETSc ``TSType`` (``"rk"``, ``"theta"``, ``"beuler"``, ``"cn"``, ``"arkimex"``).
    subtype : str or None
        ``TSRKType`` or ``TSARKIMEXType`` for the RK families.
    order : int
        Classical order of accuracy.
    adaptive : bool
        Whether an error estimate exists (embedded RK pair, or the backward-difference
        estimate of TSTHETA), so that steps adapt to ``rtol``/``atol``.  Without one,
        steps are ``options["step_size"]`` or, if that is not given, the output intervals.
    implicit : bool
        Whether stages require a nonlinear solve (Newton-Krylov through SNES).
    imex : bool
        Whether a :class:`pnode.IMEX` split (stiff part implicit, rest explicit)
        is accepted.
    theta : float or None
        Theta parameter of TSTHETA schemes.
    endpoint : bool
        TSTHETA form: endpoint (trapezoid-like) or midpoint (one stage).
    description : str
        One line for tables.
    """

    name: str
    ts_type: str
    subtype: str | None
    order: int
    adaptive: bool
    implicit: bool
    imex: bool = False
    theta: float | None = None
    endpoint: bool = False
    description: str = ""

    @property
    def petsc(self) -> str:
        """The PETSc spelling, e.g. ``"rk/5dp"``."""
        return f"{self.ts_type}/{self.subtype}" if self.subtype else self.ts_type


def _rk(name, subtype, order, adaptive, description):
    return Method(name, "rk", subtype, order, adaptive, False, description=description)


def _ark(name, subtype, order, description):
    return Method(name, "arkimex", subtype, order, True, True, imex=True, description=description)


_TABLE: dict[str, Method] = {
    m.name: m
    for m in [
        _rk("euler", "1fe", 1, False, "forward Euler"),
        _rk("midpoint", "2b", 2, False, "explicit midpoint"),
        _rk("heun", "2a", 2, True, "Heun (explicit trapezoid), Euler embedded"),
        _rk("rk3", "3", 3, False, "Kutta's third-order method"),
        _rk("bosh3", "3bs", 3, True, "Bogacki-Shampine 3(2), FSAL"),
        _rk("rk4", "4", 4, False, "classic fourth-order Runge-Kutta"),
        _rk("fehlberg5", "5f", 5, True, "Runge-Kutta-Fehlberg 5(4)"),
        _rk("dopri5", "5dp", 5, True, "Dormand-Prince 5(4), FSAL"),
        _rk("bosh5", "5bs", 5, True, "Bogacki-Shampine 5(4)"),
        _rk("verner6", "6vr", 6, True, "Verner 6(5)"),
        _rk("verner7", "7vr", 7, True, "Verner 7(6)"),
        _rk("verner8", "8vr", 8, True, "Verner 8(7)"),
        Method("implicit_euler", "beuler", None, 1, True, True, theta=1.0, endpoint=True,
               description="backward Euler (TSBEULER)"),
        Method("trapezoid", "cn", None, 2, True, True, theta=0.5, endpoint=True,
               description="trapezoidal rule / Crank-Nicolson (TSCN)"),
        Method("theta", "theta", None, 2, True, True, theta=0.5, endpoint=False,
               description="theta method, midpoint form (implicit midpoint at theta=0.5)"),
        _ark("kencarp3", "3", 3, "Kennedy-Carpenter ARK3(2)4L[2]SA (ARKIMEX 3)"),
        _ark("kencarp4", "4", 4, "Kennedy-Carpenter ARK4(3)6L[2]SA (ARKIMEX 4)"),
        _ark("kencarp5", "5", 5, "Kennedy-Carpenter ARK5(4)8L[2]SA (ARKIMEX 5)"),
    ]
}

# torchdiffeq spellings and common aliases.
_ALIASES = {
    "explicit_midpoint": "midpoint",
    "explicit_euler": "euler",
    "backward_euler": "implicit_euler",
    "beuler": "implicit_euler",
    "cn": "trapezoid",
    "crank_nicolson": "trapezoid",
    "implicit_midpoint": "theta",
}

# PETSc TS types without TSAdjoint in 3.26, to answer with a precise message.
NO_ADJOINT = {
    "rosw": "Rosenbrock-W (TSROSW)",
    "irk": "fully implicit Runge-Kutta (TSIRK)",
    "bdf": "BDF (TSBDF)",
    "mprk": "multirate partitioned RK (TSMPRK)",
    "alpha": "generalized-alpha (TSALPHA)",
    "alpha2": "generalized-alpha (TSALPHA2)",
    "glle": "general linear (TSGLLE)",
    "glee": "general linear (TSGLEE)",
    "ssp": "strong-stability-preserving RK (TSSSP)",
    "radau": "Radau IIA (not in PETSc TS)",
    "radau5": "Radau IIA (not in PETSc TS)",
    "adams": "Adams (not in PETSc TS)",
    "implicit_adams": "Adams (not in PETSc TS)",
    "scipy_solver": "scipy solvers",
}


def resolve_method(name: str) -> Method:
    """Return the :class:`Method` for ``name``.

    Accepts the names of :func:`methods`, their aliases, ``"rk:<TSRKType>"``
    (any PETSc RK tableau, e.g. ``"rk:5bs"``) and ``"arkimex:<TSARKIMEXType>"``.

    Raises
    ------
    ValueError
        If the name is unknown or names a PETSc scheme without a discrete adjoint.
    """
    if not isinstance(name, str):
        raise ValueError(f"method must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _TABLE:
        return _TABLE[key]
    if ":" in key:
        family, sub = key.split(":", 1)
        if family == "rk" and sub:
            known = {m.subtype: m for m in _TABLE.values() if m.ts_type == "rk"}
            if sub in known:
                return known[sub]
            # Unknown tableaux are passed to PETSc, which validates the name at set-up.
            return Method(key, "rk", sub, 0, True, False, description=f"PETSc TSRK '{sub}'")
        if family == "arkimex" and sub:
            return Method(key, "arkimex", sub, 0, True, True, imex=True,
                          description=f"PETSc TSARKIMEX '{sub}'")
    if key in NO_ADJOINT:
        raise ValueError(
            f"method {name!r}: {NO_ADJOINT[key]} has no discrete adjoint in PETSc 3.26 "
            "(TSAdjoint exists for TSRK, TSTHETA and TSARKIMEX). Choose one of: "
            + ", ".join(_TABLE)
        )
    raise ValueError(
        f"unknown method {name!r}; valid methods are: {', '.join(_TABLE)}, "
        "or 'rk:<TSRKType>' / 'arkimex:<TSARKIMEXType>'"
    )


def methods() -> list[Method]:
    """List the available methods.

    Returns
    -------
    list of Method
        One entry per method name, with its PETSc type, order, adaptivity,
        implicitness and IMEX capability.

    Examples
    --------
    >>> [m.name for m in pnode.methods()][:3]
    ['euler', 'midpoint', 'heun']
    """
    return list(_TABLE.values())
