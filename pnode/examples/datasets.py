"""Data for the examples, generated in code or bundled with scikit-learn (nothing is downloaded)."""

from __future__ import annotations

import math

import torch

__all__ = ["TOY_2D", "toy_2d", "tabular", "TABULAR", "split"]


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=g) < 0.5
    a = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    pts = torch.stack([x, y], 1) + 0.08 * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) * 2.0


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=g).double()
    centres = 2.0 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
    return centres + 0.2 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # a 4x4 board on [-2, 2]^2; pick a column, then a row of the right parity
    x = torch.rand(n, generator=g) * 4 - 2
    col = torch.floor(x + 2)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (col % 2)
    y = row - 2 + torch.rand(n, generator=g)
    return torch.stack([x, y], 1)


def _pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    arms, rate = 5, 0.25
    k = torch.randint(0, arms, (n,), generator=g).double()
    r = 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    w = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    angle = k * 2 * math.pi / arms + rate * torch.exp(r)
    pts = torch.stack([r, w], 1)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return 1.3 * (rot @ pts.unsqueeze(-1)).squeeze(-1)


#: name -> sampler(n, generator) of the 2-D toy densities
TOY_2D = {"moons": _moons, "8gaussians": _eight_gaussians, "checkerboard": _checkerboard,
          "pinwheel": _pinwheel}


def toy_2d(name: str, n: int, *, generator: torch.Generator,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` samples ``[n, 2]`` of a 2-D toy density.

    Parameters
    ----------
    name : {"moons", "8gaussians", "checkerboard", "pinwheel"}
        The density.
    n : int
        Number of samples.
    generator : torch.Generator
        Source of randomness (seed it for reproducible data).
    dtype : torch.dtype
        Result dtype.
    """
    if name not in TOY_2D:
        raise ValueError(f"unknown 2-D dataset {name!r}; valid: {', '.join(TOY_2D)}")
    return TOY_2D[name](n, generator).to(dtype)


#: name -> scikit-learn loader of the bundled tabular datasets
TABULAR = ("wine", "breast_cancer", "digits")


def tabular(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of a dataset bundled with scikit-learn (float64, not standardized)."""
    from sklearn import datasets

    loaders = {"wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer,
               "digits": datasets.load_digits}
    if name not in loaders:
        raise ValueError(f"unknown tabular dataset {name!r}; valid: {', '.join(TABULAR)}")
    d = loaders[name]()
    return (torch.as_tensor(d.data, dtype=torch.float64), torch.as_tensor(d.target, dtype=torch.long))


def split(n: int, test_fraction: float, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random train/test split of ``range(n)``: index tensors ``(train, test)``."""
    perm = torch.randperm(n, generator=generator)
    n_test = max(1, int(round(test_fraction * n)))
    return perm[n_test:], perm[:n_test]
