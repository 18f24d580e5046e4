"""Second-order training of neural ODEs on the PETSc adjoint (SNOpt) and integration-time control.

Public names: :class:`SNOpt`, :class:`IntegrationTime`.

Liu, Chen & Theodorou, "Second-Order Neural ODE Optimizer", NeurIPS 2021.
The engine does not import this package: :class:`SNOpt` subscribes to
:func:`pnode.adjoint.observe_vjps`.
"""

from .snopt import SNOpt
from .time_control import IntegrationTime

__all__ = ["SNOpt", "IntegrationTime"]
