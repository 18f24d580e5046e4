"""The method registry: names, the PETSc time integrators behind them, and their tableaux.

One table maps every user-facing method name (torchdiffeq's names included) to
a PETSc ``TS`` type and subtype together with the properties the engine needs:
order, whether steps adapt, whether stages are implicit, whether an IMEX split
is accepted, and for Runge-Kutta schemes a validated
:class:`~pnode.adjoint.tableau.ButcherTableau`.  The engine, the observer
weights, :mod:`pnode.adjoint.reference` and the tests all read this table;
nothing else lists methods.

Only schemes for which PETSc 3.26 implements ``TSAdjoint`` are listed (TSRK,
TSTHETA, TSARKIMEX).  Tableaux PETSc lacks (torchdiffeq's ``tsit5``,
``dopri8``, ``heun3``, ``fehlberg2``, the 3/8 rule, ``sdirk2``, ``trbdf2``) are
given here and registered with PETSc's ``TSRKRegister`` / ``TSARKIMEXRegister``
(:mod:`pnode.adjoint.petsc_register`) before first use, so they run through
PETSc's own integrator and adjoint.  PETSc's built-in tableaux are read from
PETSc (``TSRKGetTableau``) rather than copied.  torchdiffeq names without a
discrete adjoint in PETSc are refused with the nearest pnode method.

Adding a method is one entry in ``_TABLE`` below: an explicit tableau
(``_rk_new``) or a PETSc TSRK type (``_rk``).  The tests iterate over
:func:`methods`, so the new entry gets its gradient, observer-weight and
reference checks without further edits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction as F

from .tableau import ButcherTableau

__all__ = ["Method", "ButcherTableau", "resolve_method", "methods", "register_method",
           "unregister_method", "rk_method", "NO_ADJOINT", "DEFAULT_METHOD"]

DEFAULT_METHOD = "dopri5"  # what method=None means (torchdiffeq's default too)

# Prefix of the PETSc type names under which pnode registers its own tableaux.
_PREFIX = "pnode_"


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
    butcher : ButcherTableau or None
        Coefficients pnode registers with PETSc under ``subtype`` (``None`` for PETSc's
        own types, whose coefficients :attr:`tableau` reads from PETSc).
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
    butcher: ButcherTableau | None = None

    @property
    def petsc(self) -> str:
        """The PETSc spelling, e.g. ``"rk/5dp"``."""
        return f"{self.ts_type}/{self.subtype}" if self.subtype else self.ts_type

    @property
    def tableau(self) -> ButcherTableau | None:
        """The Butcher tableau PETSc integrates with (``None`` for theta and ARKIMEX types).

        For PETSc's own TSRK types it is read from PETSc (``TSRKGetTableau``), so it is
        the tableau the adjoint uses, to the last bit.

        Raises
        ------
        ValueError
            If the method names a TSRK type PETSc does not have.
        """
        if self.butcher is not None:
            return self.butcher
        if self.ts_type != "rk":
            return None
        from .petsc_register import rk_tableau

        return rk_tableau(self.subtype)

    @property
    def explicit_rk(self) -> bool:
        """Whether this is an explicit Runge-Kutta scheme (TSRK)."""
        return self.ts_type == "rk"

    def register(self) -> None:
        """Make PETSc know this method's tableau (no-op for PETSc's own types).

        Called by the engine before ``TSRKSetType`` / ``TSARKIMEXSetType``; idempotent.
        """
        if self.butcher is None:
            return
        from .petsc_register import register_dirk, register_rk

        if self.ts_type == "rk":
            register_rk(self.subtype, self.butcher)
        else:
            register_dirk(self.subtype, self.butcher)


def rk_method(name: str, tableau: ButcherTableau, *, description: str = "",
              adaptive: bool | None = None) -> Method:
    """A method row for a tableau PETSc does not have, registered as TSRK/ARKIMEX ``pnode_<name>``.

    Parameters
    ----------
    name : str
        The method name (lower case).
    tableau : ButcherTableau
        Explicit (runs as TSRK) or diagonally implicit (runs as TSARKIMEX with a zero
        explicit part).
    description : str
        One line for tables.
    adaptive : bool, optional
        Whether steps adapt; default: whether the tableau has embedded weights.  A
        fixed-step method (``False``) takes ``options["step_size"]`` or the output
        intervals, as torchdiffeq's fixed-grid solvers do.

    Returns
    -------
    Method

    Examples
    --------
    >>> ralston = ButcherTableau(A=[[0, 0], [F(2, 3), 0]], b=[F(1, 4), F(3, 4)], order=2)
    >>> m = register_method(rk_method("ralston", ralston, description="Ralston's RK2"))
    >>> ys = pnode.odeint(func, y0, t, method="ralston", options={"step_size": 0.1})
    """
    if not isinstance(tableau, ButcherTableau):
        raise ValueError(f"tableau must be a ButcherTableau, got {type(tableau).__name__}")
    adaptive = tableau.adaptive if adaptive is None else bool(adaptive)
    if adaptive and not tableau.adaptive:
        raise ValueError(f"method {name!r}: adaptive steps need embedded weights (b_embedded)")
    subtype = _PREFIX + name
    if tableau.explicit:
        return Method(name, "rk", subtype, tableau.order, adaptive, False,
                      description=description, butcher=tableau)
    return Method(name, "arkimex", subtype, tableau.order, adaptive, True,
                  description=description, butcher=tableau)


def _rk(name, subtype, order, adaptive, description):
    return Method(name, "rk", subtype, order, adaptive, False, description=description)


def _ark(name, subtype, order, description):
    return Method(name, "arkimex", subtype, order, True, True, imex=True, description=description)


def _rk_new(name, A, b, order, description, b_embedded=None, c=None, adaptive=None):
    tab = ButcherTableau(A=A, b=b, c=c, b_embedded=b_embedded, order=order)
    return rk_method(name, tab, description=description, adaptive=adaptive)


_SQRT2 = math.sqrt(2.0)
_G = 1.0 - _SQRT2 / 2.0  # the diagonal of sdirk2 and TR-BDF2 (L-stable choice)

# Tsitouras 5(4), FSAL: Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the
# first column simplifying assumption", Comput. Math. Appl. 62 (2011) 770-775, table 1.
_TSIT5_A = [
    [],
    [0.161],
    [-0.008480655492356989, 0.335480655492357],
    [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
    [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
    [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
     -0.028269050394068383],
    [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
     2.324710524099774],
]
_TSIT5_C = [0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0]
_TSIT5_B_EMBEDDED = [0.09468075576583945, 0.009183565540343254, 0.4877705284247616,
                     1.234297566930479, -2.7077123499835256, 1.866628418170587, 1.0 / 66.0]

# Prince & Dormand RK8(7)13M: P.J. Prince, J.R. Dormand, "High order embedded Runge-Kutta
# formulae", J. Comput. Appl. Math. 7 (1981) 67-75 (rational approximations of table 2).
_DOPRI8_C = [0, F(1, 18), F(1, 12), F(1, 8), F(5, 16), F(3, 8), F(59, 400), F(93, 200),
             F(5490023248, 9719169821), F(13, 20), F(1201146811, 1299019798), 1, 1]
_DOPRI8_A = [
    [],
    [F(1, 18)],
    [F(1, 48), F(1, 16)],
    [F(1, 32), 0, F(3, 32)],
    [F(5, 16), 0, F(-75, 64), F(75, 64)],
    [F(3, 80), 0, 0, F(3, 16), F(3, 20)],
    [F(29443841, 614563906), 0, 0, F(77736538, 692538347), F(-28693883, 1125000000),
     F(23124283, 1800000000)],
    [F(16016141, 946692911), 0, 0, F(61564180, 158732637), F(22789713, 633445777),
     F(545815736, 2771057229), F(-180193667, 1043307555)],
    [F(39632708, 573591083), 0, 0, F(-433636366, 683701615), F(-421739975, 2616292301),
     F(100302831, 723423059), F(790204164, 839813087), F(800635310, 3783071287)],
    [F(246121993, 1340847787), 0, 0, F(-37695042795, 15268766246), F(-309121744, 1061227803),
     F(-12992083, 490766935), F(6005943493, 2108947869), F(393006217, 1396673457),
     F(123872331, 1001029789)],
    [F(-1028468189, 846180014), 0, 0, F(8478235783, 508512852), F(1311729495, 1432422823),
     F(-10304129995, 1701304382), F(-48777925059, 3047939560), F(15336726248, 1032824649),
     F(-45442868181, 3398467696), F(3065993473, 597172653)],
    [F(185892177, 718116043), 0, 0, F(-3185094517, 667107341), F(-477755414, 1098053517),
     F(-703635378, 230739211), F(5731566787, 1027545527), F(5232866602, 850066563),
     F(-4093664535, 808688257), F(3962137247, 1805957418), F(65686358, 487910083)],
    [F(403863854, 491063109), 0, 0, F(-5068492393, 434740067), F(-411421997, 543043805),
     F(652783627, 914296604), F(11173962825, 925320556), F(-13158990841, 6184727034),
     F(3936647629, 1978049680), F(-160528059, 685178525), F(248638103, 1413531060), 0],
]
_DOPRI8_B = [F(14005451, 335480064), 0, 0, 0, 0, F(-59238493, 1068277825),
             F(181606767, 758867731), F(561292985, 797845732), F(-1041891430, 1371343529),
             F(760417239, 1151165299), F(118820643, 751138087), F(-528747749, 2220607170),
             F(1, 4)]
_DOPRI8_B_EMBEDDED = [F(13451932, 455176623), 0, 0, 0, 0, F(-808719846, 976000145),
                      F(1757004468, 5645159321), F(656045339, 265891186),
                      F(-3867574721, 1518517206), F(465885868, 322736535),
                      F(53011238, 667516719), F(2, 45), 0]

_TABLE: dict[str, Method] = {
    m.name: m
    for m in [
        _rk("euler", "1fe", 1, False, "forward Euler"),
        _rk("midpoint", "2b", 2, False, "explicit midpoint"),
        _rk("heun", "2a", 2, True, "Heun (explicit trapezoid), Euler embedded"),
        _rk("heun2", "2a", 2, False, "Heun (explicit trapezoid), fixed steps (torchdiffeq)"),
        _rk("rk3", "3", 3, False, "Kutta's third-order method"),
        _rk_new("heun3", [[], [F(1, 3)], [0, F(2, 3)]], [F(1, 4), 0, F(3, 4)], 3,
                "Heun's third-order method, fixed steps (torchdiffeq)"),
        _rk("bosh3", "3bs", 3, True, "Bogacki-Shampine 3(2), FSAL"),
        _rk("rk4", "4", 4, False, "classic fourth-order Runge-Kutta"),
        _rk_new("rk38", [[], [F(1, 3)], [F(-1, 3), 1], [1, -1, 1]],
                [F(1, 8), F(3, 8), F(3, 8), F(1, 8)], 4,
                "Kutta's 3/8 rule (torchdiffeq's 'rk4')"),
        _rk_new("fehlberg2", [[], [F(1, 2)], [F(1, 256), F(255, 256)]],
                [F(1, 512), F(255, 256), F(1, 512)], 2,
                "Runge-Kutta-Fehlberg 2(1) (torchdiffeq)",
                b_embedded=[F(1, 256), F(255, 256), 0]),
        _rk("fehlberg5", "5f", 5, True, "Runge-Kutta-Fehlberg 5(4)"),
        _rk("dopri5", "5dp", 5, True, "Dormand-Prince 5(4), FSAL"),
        _rk_new("tsit5", _TSIT5_A, _TSIT5_A[-1] + [0.0], 5, "Tsitouras 5(4), FSAL",
                b_embedded=_TSIT5_B_EMBEDDED, c=_TSIT5_C),
        _rk("bosh5", "5bs", 5, True, "Bogacki-Shampine 5(4)"),
        _rk("verner6", "6vr", 6, True, "Verner 6(5)"),
        _rk("verner7", "7vr", 7, True, "Verner 7(6)"),
        _rk("verner8", "8vr", 8, True, "Verner 8(7)"),
        _rk_new("dopri8", _DOPRI8_A, _DOPRI8_B, 8, "Prince-Dormand 8(7) (torchdiffeq's dopri8)",
                b_embedded=_DOPRI8_B_EMBEDDED, c=_DOPRI8_C),
        Method("implicit_euler", "beuler", None, 1, True, True, theta=1.0, endpoint=True,
               description="backward Euler (TSBEULER)"),
        Method("trapezoid", "cn", None, 2, True, True, theta=0.5, endpoint=True,
               description="trapezoidal rule / Crank-Nicolson (TSCN)"),
        Method("theta", "theta", None, 2, True, True, theta=0.5, endpoint=False,
               description="theta method, midpoint form (implicit midpoint at theta=0.5)"),
        _rk_new("sdirk2", [[_G], [1 - _G, _G]], [1 - _G, _G], 2,
                "L-stable two-stage SDIRK, fixed steps (torchdiffeq)"),
        _rk_new("trbdf2", [[0], [_G, _G], [_SQRT2 / 4, _SQRT2 / 4, _G]],
                [_SQRT2 / 4, _SQRT2 / 4, _G], 2, "TR-BDF2 as an ESDIRK, fixed steps (torchdiffeq)"),
        _ark("kencarp3", "3", 3, "Kennedy-Carpenter ARK3(2)4L[2]SA (ARKIMEX 3)"),
        _ark("kencarp4", "4", 4, "Kennedy-Carpenter ARK4(3)6L[2]SA (ARKIMEX 4)"),
        _ark("kencarp5", "5", 5, "Kennedy-Carpenter ARK5(4)8L[2]SA (ARKIMEX 5)"),
    ]
}

# torchdiffeq spellings and common aliases.
_ALIASES = {
    "explicit_midpoint": "midpoint",
    "explicit_euler": "euler",
    "adaptive_heun": "heun",
    "backward_euler": "implicit_euler",
    "beuler": "implicit_euler",
    "cn": "trapezoid",
    "crank_nicolson": "trapezoid",
    "implicit_midpoint": "theta",
    "rk4_38": "rk38",
    "tr_bdf2": "trbdf2",
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

# torchdiffeq methods (and near spellings) pnode refuses: (why, nearest pnode method).
_REFUSED = {
    "explicit_adams": ("Adams-Bashforth is a multistep method; PETSc has no Adams integrator "
                       "and no multistep adjoint", "rk4"),
    "implicit_adams": ("Adams-Bashforth-Moulton is a multistep method; PETSc has no Adams "
                       "integrator and no multistep adjoint", "trapezoid"),
    "fixed_adams": ("Adams-Bashforth-Moulton is a multistep method; PETSc has no Adams "
                    "integrator and no multistep adjoint", "trapezoid"),
    "adams": ("Adams methods are multistep; PETSc has no Adams integrator and no multistep "
              "adjoint", "dopri5"),
    "radauiia3": ("Radau IIA is a fully implicit Runge-Kutta method; PETSc 3.26 has no "
                  "TSAdjoint for TSIRK", "kencarp3"),
    "radauiia5": ("Radau IIA is a fully implicit Runge-Kutta method; PETSc 3.26 has no "
                  "TSAdjoint for TSIRK", "kencarp5"),
    "radau": ("Radau IIA is a fully implicit Runge-Kutta method; PETSc 3.26 has no TSAdjoint "
              "for TSIRK", "kencarp5"),
    "radau5": ("Radau IIA is a fully implicit Runge-Kutta method; PETSc 3.26 has no TSAdjoint "
               "for TSIRK", "kencarp5"),
    "gl4": ("Gauss-Legendre is a fully implicit Runge-Kutta method; PETSc 3.26 has no "
            "TSAdjoint for TSIRK (its one-stage member is 'implicit_midpoint')", "kencarp4"),
    "gl6": ("Gauss-Legendre is a fully implicit Runge-Kutta method; PETSc 3.26 has no "
            "TSAdjoint for TSIRK (its one-stage member is 'implicit_midpoint')", "kencarp5"),
    "scipy_solver": ("scipy's integrators run outside PETSc and have no discrete adjoint",
                     "dopri5 (for RK45) or kencarp5 (for stiff problems)"),
}


def _valid_names() -> str:
    return ", ".join(_TABLE)


def resolve_method(name: str | None) -> Method:
    """Return the :class:`Method` for ``name``.

    Accepts the names of :func:`methods`, their aliases (torchdiffeq's spellings
    among them), ``None`` (the default, :data:`DEFAULT_METHOD`), ``"rk:<TSRKType>"``
    (any PETSc RK tableau, e.g. ``"rk:5bs"``) and ``"arkimex:<TSARKIMEXType>"``.

    Raises
    ------
    ValueError
        If the name is unknown or names a scheme without a discrete adjoint; the
        message lists the valid names (and, for a refused torchdiffeq method, the
        nearest pnode method).
    """
    if name is None:
        name = DEFAULT_METHOD
    if not isinstance(name, str):
        raise ValueError(f"method must be a string or None, got {type(name).__name__}; "
                         f"valid methods are: {_valid_names()}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _TABLE:
        return _TABLE[key]
    if ":" in key:
        family, sub = key.split(":", 1)
        if family == "rk" and sub:
            for m in _TABLE.values():  # the first row of a PETSc type is its canonical name
                if m.ts_type == "rk" and m.subtype == sub:
                    return m
            # Unknown tableaux are passed to PETSc, which validates the name at set-up.
            return Method(key, "rk", sub, 0, True, False, description=f"PETSc TSRK '{sub}'")
        if family == "arkimex" and sub:
            return Method(key, "arkimex", sub, 0, True, True, imex=True,
                          description=f"PETSc TSARKIMEX '{sub}'")
    if key in _REFUSED:
        why, nearest = _REFUSED[key]
        raise ValueError(f"method {name!r} has no discrete adjoint in pnode: {why}. The "
                         f"nearest pnode method is {nearest}. Valid methods are: "
                         f"{_valid_names()}")
    if key in NO_ADJOINT:
        raise ValueError(
            f"method {name!r}: {NO_ADJOINT[key]} has no discrete adjoint in PETSc 3.26 "
            f"(TSAdjoint exists for TSRK, TSTHETA and TSARKIMEX). Valid methods are: "
            f"{_valid_names()}"
        )
    raise ValueError(
        f"unknown method {name!r}; valid methods are: {_valid_names()}, "
        "or 'rk:<TSRKType>' / 'arkimex:<TSARKIMEXType>'"
    )


def methods() -> list[Method]:
    """List the available methods.

    Returns
    -------
    list of Method
        One entry per method name, with its PETSc type, order, adaptivity,
        implicitness, IMEX capability and (Runge-Kutta) tableau.

    Examples
    --------
    >>> [m.name for m in pnode.methods()][:3]
    ['euler', 'midpoint', 'heun']
    """
    return list(_TABLE.values())


def register_method(method: Method) -> Method:
    """Add a method to the registry at run time (e.g. from :func:`rk_method`).

    A method that ships with pnode is an entry of the table in this module; this
    function is for a user's own tableau, and for tests that register a throwaway one.

    Parameters
    ----------
    method : Method
        The new row; its name must be new (also among the aliases).

    Returns
    -------
    Method
        ``method``, now accepted as ``method=method.name``.

    Raises
    ------
    ValueError
        If the name is taken or is not a plain lower-case identifier.
    """
    if not isinstance(method, Method):
        raise ValueError(f"register_method needs a Method, got {type(method).__name__}")
    name = method.name
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"method name {name!r} must be a lower-case identifier")
    if name in _TABLE or name in _ALIASES or name in _REFUSED or name in NO_ADJOINT:
        raise ValueError(f"method name {name!r} is already taken")
    _TABLE[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added by :func:`register_method`.

    PETSc keeps a registered tableau until the process ends (it has no unregister);
    registering the same name again with the same tableau reuses it.

    Raises
    ------
    ValueError
        If ``name`` is not a registered method.
    """
    if name not in _TABLE:
        raise ValueError(f"no method named {name!r}")
    del _TABLE[name]
