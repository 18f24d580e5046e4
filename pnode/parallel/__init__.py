"""MPI parallelism on top of the engine.

Data decomposition is built into :func:`pnode.odeint` (``comm=``): each rank
integrates its shard of the batch on a distributed PETSc Vec and receives the
parameter gradients summed over ranks.  :class:`DataParallel` does the rest of
a data-parallel training loop: sharding, identical initial parameters, the
gradient reduction for parameters outside ODE blocks, rank-0 logging.

Layer decomposition (a pipeline over time sub-intervals) is not implemented yet.
"""

from .data import DataParallel, shard_slice

__all__ = ["DataParallel", "shard_slice"]
