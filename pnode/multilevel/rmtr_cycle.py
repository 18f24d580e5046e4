"""The V-cycle of :class:`pnode.multilevel.RMTR`: smoothing, coarse corrections, radii.

Gratton, Sartenaer & Toint, "Recursive trust-region methods for multiscale
nonlinear optimization", SIAM J. Optim. 19(1), 2008.
"""

from __future__ import annotations

import math

import torch

from .rmtr_levels import _Level, _NonFinite, _State
from .sr1 import LSR1
from .trust_region import TRSolution, solve_compact, steihaug_cg


class _VCycle:
    """Recursive trust-region cycle over ``self.levels`` (a mixin of :class:`RMTR`).

    The host provides ``levels``, ``options``, ``_top`` (the level acting as
    finest), ``_accepted`` (a counter of accepted steps) and ``_objective(l, x)``.
    """

    def _solve(self, g: torch.Tensor, B: LSR1, radius: float) -> TRSolution:
        if self.options["subproblem"] == "cg":
            return steihaug_cg(g, B.matvec, radius)
        return solve_compact(g, B, radius)

    # -- trust-region machinery ---------------------------------------------------------
    def _eff_radius(self, l: int, x: torch.Tensor) -> float:
        """Level radius, cut so that the prolongated total step stays in the finer radius."""
        lvl = self.levels[l]
        if l == self._top:
            return lvl.radius
        used = float(lvl.transfer.prolong(x - lvl.x0).norm())
        return min(lvl.radius, (lvl.budget - used) / lvl.transfer.norm)

    def _budget_spent(self, l: int, x: torch.Tensor) -> bool:
        lvl = self.levels[l]
        if l == self._top:
            return False
        return self._eff_radius(l, x) <= self.options["eps_budget"] * lvl.budget / lvl.transfer.norm

    def _update_radius(self, lvl: _Level, rho: float, snorm: float, r: float) -> None:
        o = self.options
        if rho < o["eta1"]:
            # shrink the radius, not the step: a short failed coarse correction says little about
            # the region in which the fine model can be trusted
            lvl.radius = max(o["shrink"] * min(lvl.radius, r), 0.1 * o["min_radius"])
        elif rho >= o["eta2"] and snorm >= 0.9 * r:
            lvl.radius = min(o["expand"] * lvl.radius, o["max_radius"])

    def _try(self, l: int, st: _State, s: torch.Tensor, predicted: float, r: float) -> bool:
        """Evaluate ``x + s``, update L-SR1 and the radius, accept if the ratio allows."""
        lvl = self.levels[l]
        try:
            f_t, g_t, correct = self._objective(l, st.x + s)
            rho = (st.f - f_t) / predicted
        except _NonFinite:
            f_t, g_t, correct, rho = math.inf, None, math.nan, -math.inf
        if g_t is not None:
            lvl.sr1.update(s, g_t - st.g)
        self._update_radius(lvl, rho, float(s.norm()), r)
        if rho >= self.options["eta1"] and f_t < st.f:
            st.x, st.f, st.g, st.correct = st.x + s, f_t, g_t, correct
            self._accepted += 1
            return True
        return False

    def _smooth(self, l: int, st: _State) -> bool:
        """One trust-region iteration at level ``l``; False when nothing can be done."""
        if self._budget_spent(l, st.x) or float(st.g.norm()) <= self.options["gtol"]:
            return False
        r = self._eff_radius(l, st.x)
        if r <= self.options["min_radius"]:
            return False
        sol = self._solve(st.g, self.levels[l].sr1, r)
        if not sol.predicted > 0:
            self.levels[l].sr1.reset()  # a model that predicts no decrease is useless
            return False
        self._try(l, st, sol.step, sol.predicted, r)
        return True

    def _coarse_correction(self, l: int, st: _State) -> None:
        """Recursive step: minimise the coarse model of level ``l`` and prolongate."""
        o, c = self.options, self.levels[l - 1]
        tr = c.transfer
        gc = tr.restrict_gradient(st.g)
        gnorm = float(st.g.norm())
        if gnorm <= o["gtol"] or float(gc.norm()) < o["kappa_g"] * gnorm:
            return
        budget = self._eff_radius(l, st.x)
        if budget <= o["min_radius"]:
            return
        xc0 = tr.restrict(st.x)
        c.v, c.x0 = None, xc0
        try:
            fc0, gfc0, _ = self._objective(l - 1, xc0)
        except _NonFinite:
            return
        c.v, c.budget = gc - gfc0, budget
        cst = _State(xc0, fc0, gc, n=st.n)
        self._cycle(l - 1, cst)
        predicted = fc0 - cst.f
        if not predicted > 0:
            return
        s = tr.prolong(cst.x - xc0)
        self._try(l, st, s, predicted, budget)

    def _cycle(self, l: int, st: _State) -> None:
        o = self.options
        if l == 0:
            n = 1 if l == self._top else o["coarse_iterations"]
            for _ in range(n):
                if not self._smooth(l, st):
                    break
            return
        for _ in range(o["pre_smoothing"]):
            if not self._smooth(l, st):
                break
        if not self._budget_spent(l, st.x):
            self._coarse_correction(l, st)
        for _ in range(o["post_smoothing"]):
            if not self._smooth(l, st):
                break
