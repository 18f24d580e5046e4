"""Butcher tableaux, validated when built.

A :class:`ButcherTableau` holds the coefficients of one Runge-Kutta scheme
(``A``, ``b``, ``c``, optionally an embedded ``b``) and its order.  Building one
checks the order conditions every consistent scheme satisfies (each row of ``A``
sums to its ``c``, the weights sum to one) and the structure PETSc can
integrate with an exact adjoint (``A`` lower triangular: explicit, or diagonally
implicit); a tableau that fails is refused with a ``ValueError`` naming the
entry.  Properties such as "explicit" and "first same as last" are derived from
the coefficients, never declared, so they cannot disagree with them.

Examples
--------
>>> from fractions import Fraction as F
>>> ralston = ButcherTableau(A=[[0, 0], [F(2, 3), 0]], b=[F(1, 4), F(3, 4)], order=2)
>>> ralston.c, ralston.explicit, ralston.fsal
((0.0, 0.6666666666666666), True, False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real

__all__ = ["ButcherTableau"]

# Coefficients are float64; sums of up to ~16 terms of size <= ~100 carry round-off of a few
# 1e-14, while a wrong coefficient is off by far more.
_TOL = 1e-12


def _vector(name: str, values: Sequence[Real], n: int | None) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"ButcherTableau: {name} must be a sequence of real numbers") from None
    if n is not None and len(out) != n:
        raise ValueError(f"ButcherTableau: {name} has {len(out)} entries, expected {n} "
                         "(one per stage)")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"ButcherTableau: {name} has a non-finite entry: {out}")
    return out


def _close(x: float, y: float, scale: float) -> bool:
    return abs(x - y) <= _TOL * max(1.0, scale)


@dataclass(frozen=True)
class ButcherTableau:
    """The coefficients of a Runge-Kutta scheme with ``s`` stages.

    Stage ``i`` of a step of size ``h`` from ``(t, y)`` is evaluated at
    ``t + c[i] h`` and ``Y_i = y + h sum_j A[i][j] f(Y_j)``; the step ends at
    ``y + h sum_i b[i] f(Y_i)``.

    Parameters
    ----------
    A : sequence of sequences of float
        The ``s x s`` Runge-Kutta matrix (rows may be given short; missing entries are 0).
        Lower triangular: strictly lower for an explicit scheme, with a diagonal for a
        diagonally implicit one.  Fully implicit tableaux are refused (PETSc 3.26 has no
        adjoint for TSIRK).
    b : sequence of float
        The weights; they sum to 1.
    c : sequence of float, optional
        The nodes; each equals the sum of its row of ``A``.  Default: the row sums.
    b_embedded : sequence of float, optional
        Weights of an embedded scheme of lower order (its difference with ``b`` is the
        local error estimate that adapts the steps); they sum to 1.
    order : int
        Classical order of the scheme given by ``b``.

    Raises
    ------
    ValueError
        If a shape is wrong, an entry is not finite, ``A`` has an entry above its
        diagonal, a row of ``A`` does not sum to its ``c``, or ``b`` (or
        ``b_embedded``) does not sum to 1.
    """

    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...] | None = None
    b_embedded: tuple[float, ...] | None = None
    order: int = 1

    def __post_init__(self) -> None:
        rows = self.A
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
            raise ValueError("ButcherTableau: A must be a non-empty sequence of rows")
        b = _vector("b", self.b, None)
        s = len(b)
        if len(rows) != s:
            raise ValueError(f"ButcherTableau: A has {len(rows)} rows but b has {s} weights")
        A, exact_sums = [], []
        for i, row in enumerate(rows):
            r = _vector(f"row {i} of A", row, None)
            # the exact sum of the given entries (a Fraction stays exact), rounded once
            exact_sums.append(float(sum((Fraction(x) for x in row), Fraction(0))))
            if len(r) > s:
                raise ValueError(f"ButcherTableau: row {i} of A has {len(r)} entries, more "
                                 f"than the {s} stages")
            A.append(r + (0.0,) * (s - len(r)))
        for i in range(s):
            upper = [j for j in range(i + 1, s) if A[i][j] != 0.0]
            if upper:
                raise ValueError(
                    f"ButcherTableau: A[{i}][{upper[0]}] = {A[i][upper[0]]} lies above the "
                    "diagonal; only explicit (strictly lower) and diagonally implicit (lower) "
                    "tableaux have a discrete adjoint in PETSc (TSRK, TSARKIMEX)")
        sums = exact_sums
        c = tuple(sums) if self.c is None else _vector("c", self.c, s)
        for i in range(s):
            if not _close(sums[i], c[i], math.fsum(abs(x) for x in A[i])):
                raise ValueError(f"ButcherTableau: row {i} of A sums to {sums[i]!r}, "
                                 f"but c[{i}] = {c[i]!r}; each row must sum to its node")
        for name, w in (("b", b), ("b_embedded", self.b_embedded)):
            if w is None:
                continue
            w = _vector(name, w, s)
            total = math.fsum(w)
            if not _close(total, 1.0, math.fsum(abs(x) for x in w)):
                raise ValueError(f"ButcherTableau: the weights {name} sum to {total!r}, not 1")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"ButcherTableau: order must be a positive int, got {self.order!r}")
        object.__setattr__(self, "A", tuple(A))
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "c", c)
        if self.b_embedded is not None:
            object.__setattr__(self, "b_embedded", _vector("b_embedded", self.b_embedded, s))

    @property
    def stages(self) -> int:
        """Number of stages ``s``."""
        return len(self.b)

    @property
    def explicit(self) -> bool:
        """Whether ``A`` is strictly lower triangular (no stage needs a solve)."""
        return all(self.A[i][i] == 0.0 for i in range(self.stages))

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is the step's end point.

        True when the last row of ``A`` equals ``b`` and ``c[-1] = 1``, so the last
        stage's slope is the next step's first.  PETSc's TSRK derives the same flag
        (it then skips that stage in the adjoint, whose weight is zero).
        """
        # PETSc compares the last row with b exactly; c[-1] is its row sum (to round-off)
        return (self.explicit and self.stages > 1 and self.A[-1] == self.b
                and abs(self.c[-1] - 1.0) <= _TOL)

    @property
    def adaptive(self) -> bool:
        """Whether an embedded scheme gives an error estimate."""
        return self.b_embedded is not None

    def flat(self) -> tuple[list[float], list[float], list[float], list[float] | None]:
        """``A`` row-major, ``b``, ``c`` and ``b_embedded`` as flat lists (PETSc's layout)."""
        return ([x for row in self.A for x in row], list(self.b), list(self.c),
                None if self.b_embedded is None else list(self.b_embedded))
