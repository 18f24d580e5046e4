"""Models: vector fields, continuous normalizing flows, ODE classifiers, stiff systems, PDE operators."""

from .classifier import ConvField, ODEClassifier
from .cnf import CNF, CNFField, ConcatMLP, standard_normal_logprob
from .fields import TimeMLP
from .pde import BurgersAdvection, Diffusion, StencilClosure, random_fourier_fields
from .stiff import Robertson, VanDerPol

__all__ = ["TimeMLP", "Robertson", "VanDerPol", "CNF", "CNFField", "ConcatMLP",
           "standard_normal_logprob", "ODEClassifier", "ConvField", "Diffusion", "BurgersAdvection",
           "StencilClosure", "random_fourier_fields"]
