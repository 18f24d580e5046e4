"""MPI parallelism on top of the engine.

Data decomposition is built into :func:`pnode.odeint` (``comm=``): each rank
integrates its shard of the batch on a distributed PETSc Vec and receives the
parameter gradients summed over ranks.  :class:`DataParallel` does the rest of
a data-parallel training loop: sharding, identical initial parameters, the
gradient reduction for parameters outside ODE blocks, rank-0 logging.
:class:`LayerParallel` splits the integration interval over the ranks instead
(layer decomposition) and trains through a micro-batched pipeline.
"""

from .data import DataParallel, shard_slice
from .layers import LayerParallel

__all__ = ["DataParallel", "LayerParallel", "shard_slice"]
