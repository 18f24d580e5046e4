"""Models: vector fields and stiff benchmark systems."""

from .fields import TimeMLP
from .stiff import Robertson, VanDerPol

__all__ = ["TimeMLP", "Robertson", "VanDerPol"]
