"""Multilevel training of ResNets viewed as forward Euler (RMTR).

Public names::

    ResNet, ConvResNet          # Euler-block networks integrated by pnode.odeint
    Transfer, prolongation_matrix
    LSR1                        # limited-memory SR1 in compact form
    solve_compact, steihaug_cg, TRSolution
    BatchSchedule               # hybrid stochastic-deterministic mini-batches
    RMTR, History

Kopaničáková & Krause, "Globally convergent multilevel training of deep residual
networks", SIAM J. Sci. Comput. 45(3), 2023.
"""

from .resnet import ConvField, ConvResNet, MLPField, ResNet, TimeStepField
from .rmtr import RMTR, History
from .sampling import BatchSchedule
from .sr1 import LSR1
from .transfer import Transfer, prolongation_matrix
from .trust_region import TRSolution, solve_compact, steihaug_cg

__all__ = [
    "ResNet", "ConvResNet", "TimeStepField", "MLPField", "ConvField", "Transfer", "prolongation_matrix",
    "LSR1", "solve_compact", "steihaug_cg", "TRSolution", "BatchSchedule", "RMTR", "History",
]
