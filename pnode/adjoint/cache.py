"""The solver cache: PETSc solvers reused across odeint calls, leased one call at a time.

Building a TS costs more than a small solve, so :class:`SolverCache` keeps solvers
between calls, in one pool per ``func`` (the pool dies with ``func``: it holds no
reference to it between calls) and, within a pool, by everything that shapes the
PETSc objects (state layout, parameters, method, options, number of output
times).  Three promises:

- **Leases.** A call leases a solver for its forward and backward; the lease is
  returned after the adjoint, or when autograd frees the output's graph without a
  backward pass.  Returning it drops the solver's trajectory (PETSc's stored
  states and stages, the replay state, the kept graphs): an idle solver holds no
  memory in proportion to the steps of its last solve.
- **A bound.** A pool holds at most ``max_per_func`` solvers (default
  :data:`MAX_SOLVERS_PER_FUNC`); beyond it the least recently used one is
  evicted, so a stream of distinct batch sizes or lengths of ``t`` does not grow
  memory.  A leased solver that is evicted is destroyed when its lease ends.
- **Collective destruction.** Destroying PETSc objects on a multi-rank
  communicator is collective, but garbage collection (of a ``func``, of a lease)
  happens at different moments on different ranks.  Collective solvers are
  therefore never destroyed, nor their trajectories dropped, where they are given
  up: they wait until a collective odeint call, where the ranks agree
  (:meth:`SolverCache.collective_state`, :meth:`SolverCache.agree`) on which
  every rank has given up, and act on those together, in creation order.
  Eviction depends only on the order of acquisitions, which is the same on every
  rank.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .solver import TSSolver

__all__ = ["SolverCache", "Lease", "CACHE", "MAX_SOLVERS_PER_FUNC"]

#: Default bound on the solvers cached for one ``func`` (least recently used evicted).
MAX_SOLVERS_PER_FUNC = 16


class Lease:
    """A solver checked out for one forward/backward pair.

    Released after the adjoint, or when autograd frees the graph without
    calling backward (e.g. a loss that was never differentiated), so the
    solver returns to its pool either way.
    """

    def __init__(self, solver: TSSolver, release: Callable[[TSSolver], None]) -> None:
        self.solver = solver
        self._finalizer = weakref.finalize(self, release, solver)

    def release(self) -> None:
        self._finalizer()

    @property
    def active(self) -> bool:
        return self._finalizer.alive


class _Pool:
    """The cached solvers of one ``func``, by key, in least-recently-used order."""

    def __init__(self) -> None:
        self.lru: OrderedDict[int, TSSolver] = OrderedDict()  # id(solver) -> solver
        self.by_key: dict[Hashable, list[TSSolver]] = {}

    def find(self, key: Hashable) -> TSSolver | None:
        for s in self.by_key.get(key, ()):
            if not s.busy and not s.broken:
                self.lru.move_to_end(id(s))
                return s
        return None

    def add(self, key: Hashable, solver: TSSolver) -> None:
        self.by_key.setdefault(key, []).append(solver)
        self.lru[id(solver)] = solver
        solver.pool, solver.cache_key = self, key

    def remove(self, solver: TSSolver) -> None:
        self.lru.pop(id(solver), None)
        same = self.by_key.get(solver.cache_key, [])
        if solver in same:
            same.remove(solver)
            if not same:
                del self.by_key[solver.cache_key]
        solver.pool = None

    def oldest(self) -> TSSolver:
        return next(iter(self.lru.values()))

    def __len__(self) -> int:
        return len(self.lru)


class SolverCache:
    """Pools of :class:`TSSolver` by ``func``, the leases on them and their destruction.

    Parameters
    ----------
    max_per_func : int
        Most solvers kept for one ``func`` (least recently used evicted first).
    """

    def __init__(self, max_per_func: int = MAX_SOLVERS_PER_FUNC) -> None:
        self.max_per_func = max_per_func
        self._lock = threading.RLock()
        self._pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Collective solvers waiting for a collective destruction, or for their trajectory
        # to be dropped, by creation number (the same on every rank: collective solvers
        # are created by collective odeint calls, in the same order).
        self.graveyard: dict[int, TSSolver] = {}
        self.stale: dict[int, TSSolver] = {}
        self._created = itertools.count()
        self.last: TSSolver | None = None  # the most recent solver (last_stats)

    # -- leases ---------------------------------------------------------------------------
    def acquire(self, owner: Any, key: Hashable, build: Callable[[], TSSolver]) -> Lease:
        """Lease an idle solver of ``owner``'s pool with ``key``, or build one.

        ``owner`` scopes the pool (it must be weak-referenceable to be cached; other
        solvers are destroyed when their lease ends).
        """
        with self._lock:
            pool = self._pool(owner)
            solver = pool.find(key) if pool is not None else None
            if solver is None:
                solver = build()
                if solver.dist is not None:
                    solver.seq = next(self._created)
                if pool is not None:
                    pool.add(key, solver)
                    self._bound(pool, solver)
            if solver.seq is not None:
                self.stale.pop(solver.seq, None)  # its next forward replaces the trajectory
            solver.busy = True
        self.last = solver
        return Lease(solver, self.release)

    def _pool(self, owner: Any) -> _Pool | None:
        try:
            pool = self._pools.get(owner)
        except TypeError:  # not weak-referenceable: no caching
            return None
        if pool is None:
            pool = self._pools[owner] = _Pool()
            weakref.finalize(owner, self._destroy_pool, pool)
        return pool

    def _bound(self, pool: _Pool, keep: TSSolver) -> None:
        """Evict least recently used solvers beyond the bound (never ``keep``)."""
        while len(pool) > self.max_per_func:
            old = pool.oldest()
            if old is keep:
                break
            pool.remove(old)
            if not old.busy:
                self._destroy(old)
            # a leased solver has pool None now: its release destroys it

    def release(self, solver: TSSolver) -> None:
        """Return a solver: drop every reference to the caller's func and the trajectory."""
        prob = solver.problem
        for part in (prob.explicit, prob.implicit):
            if part is not None:
                part.func = part.point = part.last_point = None
        prob.params = ()
        prob.mass = None
        prob.keep_graphs(False)
        solver.y0 = None
        solver.busy = False
        with self._lock:
            if solver.pool is None or solver.broken:
                if solver.pool is not None:
                    solver.pool.remove(solver)
                self._destroy(solver)
            elif solver.dist is None:
                solver.drop_trajectory()
            else:  # dropped together with the other ranks (see agree)
                self.stale[solver.seq] = solver

    # -- destruction ----------------------------------------------------------------------
    def _destroy(self, solver: TSSolver) -> None:
        """Destroy a solver's PETSc objects now, or for a collective one, schedule that."""
        if solver.dist is None:
            solver.destroy()
        else:
            self.stale.pop(solver.seq, None)
            self.graveyard[solver.seq] = solver

    def _destroy_pool(self, pool: _Pool) -> None:
        with self._lock:
            for s in list(pool.lru.values()):
                pool.remove(s)
                if not s.busy:
                    self._destroy(s)

    def clear(self) -> None:
        """Destroy every cached solver (collective ones at the next collective call).

        A leased solver leaves its pool now and is destroyed when its lease ends.
        """
        with self._lock:
            for pool in list(self._pools.values()):
                self._destroy_pool(pool)
            self._pools.clear()

    def collective_state(self) -> tuple[frozenset[int], frozenset[int]]:
        """This rank's collective solvers to destroy and to drop trajectories of (to gather)."""
        with self._lock:
            return frozenset(self.graveyard), frozenset(self.stale)

    def agree(self, states: Iterable[tuple[frozenset[int], frozenset[int]]]) -> None:
        """At a collective call: act on what every rank's :meth:`collective_state` holds.

        Runs on every rank with the same gathered states, so every rank destroys the
        same solvers and drops the same trajectories, in creation order.
        """
        states = list(states)
        doomed = frozenset.intersection(*(d for d, _ in states))
        stale = frozenset.intersection(*(s for _, s in states)) - doomed
        with self._lock:
            dead = [self.graveyard.pop(seq) for seq in sorted(doomed)]
            idle = [self.stale.pop(seq) for seq in sorted(stale)]
        for solver in dead:
            solver.destroy()
        for solver in idle:
            solver.drop_trajectory()

    def live(self, owner: Any = None) -> int:
        """Number of cached solvers (of ``owner``'s pool, or of every pool)."""
        with self._lock:
            if owner is not None:
                pool = self._pools.get(owner)
                return 0 if pool is None else len(pool)
            return sum(len(p) for p in self._pools.values())


#: The process's solver cache (used by :func:`pnode.odeint`).
CACHE = SolverCache()
