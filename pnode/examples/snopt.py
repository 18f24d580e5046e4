"""``pnode run snopt``: the digits ODE-block classifier trained with SNOpt.

Same data and model as ``pnode run digits``; the optimiser is
:class:`pnode.control.SNOpt` (Liu, Chen and Theodorou, NeurIPS 2021): the
Linear layers inside the ODE function are preconditioned with Kronecker
factors integrated along the trajectory during PETSc's adjoint sweep, the
encoder and head with ordinary K-FAC.  Explicit Runge-Kutta methods only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..control import SNOpt
from .digits import Digits
from .runner import Option

__all__ = ["DigitsSNOpt"]


class DigitsSNOpt(Digits):
    """The :class:`~pnode.examples.Digits` classifier, trained by SNOpt."""

    name = "snopt"
    summary = "the digits classifier trained by SNOpt (second-order, factors from the adjoint sweep)"
    options = tuple(o for o in Digits.options if o.name not in ("lr", "arch")) + (
        Option("lr", float, 0.5, "SNOpt learning rate (base='sgd'; about 1e-3 for 'adam')"),
        Option("arch", str, "mlp", "encoder and field: dense or convolutional", choices=("mlp", "conv")),
        Option("base", str, "sgd", "update SNOpt preconditions", choices=("sgd", "adam")),
        Option("damping", float, 1e-2, "Tikhonov damping of the Kronecker factors"),
        Option("update_freq", int, 4, "refresh the factors every N steps"),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        # under mpirun: factors combined by shard size, the engine having summed the gradients
        self.optimizer = SNOpt(self.model, lr=c["lr"], base=c["base"], damping=c["damping"],
                               update_freq=c["update_freq"], inv_freq=c["update_freq"],
                               comm=self.run_comm.comm, reduction="sum")
