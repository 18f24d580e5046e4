"""ResNets as forward Euler: residual blocks integrated by :func:`pnode.odeint`.

A residual network ``x_{k+1} = x_k + h f(x_k; theta_k)``, ``h = T / depth``, is
the forward Euler discretisation of ``dx/dt = f(x; theta(t))`` with parameters
that are piecewise constant in time (Haber & Ruthotto, "Stable architectures for
deep neural networks", Inverse Problems 34, 2018).  The multilevel trainer
(:class:`pnode.multilevel.RMTR`) exploits this view: halving the depth doubles
``h`` and gives a coarse model of the same network (Kopaničáková & Krause,
"Globally convergent multilevel training of deep residual networks", SIAM J. Sci.
Comput., 2023).

The blocks are one ``pnode.odeint(..., method="euler")`` solve, so gradients come
from PETSc's discrete adjoint and equal backpropagation through the residual loop.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..adjoint import odeint

__all__ = ["ResNet", "ConvResNet", "TimeStepField", "MLPField", "ConvField"]

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "softplus": nn.functional.softplus}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"Invalid activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class TimeStepField(nn.Module):
    """A vector field ``f(t, x) = f(x; theta_k)`` whose parameters are constant on each step.

    Subclasses store every per-step parameter as one tensor stacked along dimension 0
    (length ``depth``) and implement :meth:`block`.  The step index is recovered from
    the time as ``k = round((t - t0) / h)``, clipped to ``[0, depth - 1]``: PETSc calls
    the field at the left end of each Euler step, and rounding absorbs the
    floating-point drift of accumulated step times.

    Parameters
    ----------
    depth : int
        Number of residual blocks (Euler steps).
    T : float
        Final time; the step is ``h = T / depth``.
    t0 : float
        Initial time.
    """

    def __init__(self, depth: int, T: float = 1.0, t0: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"Invalid depth {depth!r}: pass a positive int")
        if not (isinstance(T, (int, float)) and T > 0 and math.isfinite(T)):
            raise ValueError(f"Invalid T {T!r}: pass a positive finite number")
        self.depth, self.T, self.t0 = depth, float(T), float(t0)

    @property
    def h(self) -> float:
        """Step size ``T / depth``."""
        return self.T / self.depth

    def index(self, t: torch.Tensor | float) -> int:
        """Index of the block active at time ``t`` (rounded, clipped)."""
        k = int(round((float(t) - self.t0) / self.h))
        return min(max(k, 0), self.depth - 1)

    def time_parameters(self) -> list[nn.Parameter]:
        """The parameters stacked along time (dimension 0 has length ``depth``)."""
        return list(self.parameters())

    def block(self, k: int, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.index(t), x)


class MLPField(TimeStepField):
    """Dense residual blocks ``f(x; W_k, b_k) = act(x W_k^T + b_k)``."""

    def __init__(self, width: int, depth: int, T: float = 1.0, activation: str = "tanh") -> None:
        super().__init__(depth, T)
        self.act_name, self.act = activation, _activation(activation)
        # Small weights: each block is a perturbation of the identity of size O(h).
        self.weight = nn.Parameter(torch.randn(depth, width, width) / math.sqrt(width))
        self.bias = nn.Parameter(torch.zeros(depth, width))

    def block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.weight[k].T + self.bias[k])


class ConvField(TimeStepField):
    """Convolutional residual blocks ``f(x; K_k, b_k) = act(conv3x3(x; K_k) + b_k)``."""

    def __init__(self, channels: int, depth: int, T: float = 1.0, activation: str = "tanh") -> None:
        super().__init__(depth, T)
        self.act_name, self.act = activation, _activation(activation)
        self.weight = nn.Parameter(torch.randn(depth, channels, channels, 3, 3) / math.sqrt(9 * channels))
        self.bias = nn.Parameter(torch.zeros(depth, channels))

    def block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return self.act(nn.functional.conv2d(x, self.weight[k], self.bias[k], padding=1))


class _EulerResNet(nn.Module):
    """Shared machinery: input layer, Euler blocks by the engine, output layer."""

    field: TimeStepField

    def __init__(self, checkpoint: str = "graph") -> None:
        super().__init__()
        self.checkpoint = checkpoint

    @property
    def depth(self) -> int:
        """Number of residual blocks."""
        return self.field.depth

    @property
    def T(self) -> float:
        """Final time of the residual ODE."""
        return self.field.T

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The residual blocks: one forward Euler solve on ``[t0, t0 + T]``."""
        t = torch.tensor([self.field.t0, self.field.t0 + self.field.T], dtype=x.dtype)
        ys = odeint(self.field, x, t, method="euler", options={"step_size": self.field.h},
                    checkpoint=self.checkpoint)
        return ys[-1]

    def time_parameter_flags(self) -> list[bool]:
        """For each tensor of :meth:`parameters`, whether it is stacked along time."""
        stacked = {id(p) for p in self.field.time_parameters()}
        return [id(p) in stacked for p in self.parameters()]

    def with_depth(self, depth: int) -> _EulerResNet:
        """A copy of this network with ``depth`` blocks over the same ``T``.

        The time-stacked parameters are re-initialised to the right shape; set them
        with the transfer operators of :mod:`pnode.multilevel.transfer`.
        """
        if not (isinstance(depth, int) and depth >= 1):
            raise ValueError(f"Invalid depth {depth!r}: pass a positive int")
        new = copy.deepcopy(self)
        old = new.field
        for name, p in list(old.named_parameters()):
            shape = (depth, *p.shape[1:])
            setattr(old, name, nn.Parameter(p.detach().new_zeros(shape)))
        old.depth = depth
        return new


class ResNet(_EulerResNet):
    """Fully connected ResNet ``input -> depth Euler blocks -> output``.

    ``x_0 = act(A x + a)``, ``x_{k+1} = x_k + h act(W_k x_k + b_k)`` for
    ``k < depth`` with ``h = T / depth``, output ``C x_depth + c``.  The blocks are
    integrated by ``pnode.odeint(method="euler", options={"step_size": h})``, so the
    gradient is PETSc's discrete adjoint (identical to backpropagation through the
    loop).  See Kopaničáková & Krause, SIAM J. Sci. Comput. (2023), Sec. 2.

    Parameters
    ----------
    in_features, width, depth, out_features : int
        Input size, state width, number of residual blocks, output size.
    T : float, default 1.0
        Final time of the residual ODE.
    activation : {"tanh", "relu", "softplus"}
        Nonlinearity of the input layer and the blocks.
    checkpoint : str, default "graph"
        Checkpoint policy passed to :func:`pnode.odeint`.

    Examples
    --------
    >>> net = pnode.multilevel.ResNet(64, 32, 16, 10).double()
    >>> logits = net(torch.randn(8, 64, dtype=torch.float64))
    """

    def __init__(self, in_features: int, width: int, depth: int, out_features: int, T: float = 1.0,
                 *, activation: str = "tanh", checkpoint: str = "graph") -> None:
        super().__init__(checkpoint)
        for name, v in (("in_features", in_features), ("width", width), ("out_features", out_features)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"Invalid {name} {v!r}: pass a positive int")
        self.inp = nn.Linear(in_features, width)
        self.act = _activation(activation)
        self.field = MLPField(width, depth, T, activation)
        self.out = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.act(self.inp(x))))


class ConvResNet(_EulerResNet):
    """Convolutional ResNet for small images (e.g. 8x8 digits).

    ``3x3 conv (in_channels -> channels)``, then ``depth`` Euler blocks
    ``x + h act(conv3x3(x; K_k) + b_k)``, then global average pooling and a
    linear classifier.  Same multilevel structure as :class:`ResNet`.

    Parameters
    ----------
    in_channels, channels, depth, out_features : int
        Image channels, state channels, number of blocks, number of outputs.
    T : float, default 1.0
        Final time.
    activation : {"tanh", "relu", "softplus"}
        Nonlinearity.
    checkpoint : str, default "graph"
        Checkpoint policy passed to :func:`pnode.odeint`.

    Examples
    --------
    >>> net = pnode.multilevel.ConvResNet(1, 8, 16, 10).double()
    >>> net(torch.randn(4, 1, 8, 8, dtype=torch.float64)).shape
    torch.Size([4, 10])
    """

    def __init__(self, in_channels: int, channels: int, depth: int, out_features: int, T: float = 1.0,
                 *, activation: str = "tanh", checkpoint: str = "graph") -> None:
        super().__init__(checkpoint)
        for name, v in (("in_channels", in_channels), ("channels", channels),
                        ("out_features", out_features)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"Invalid {name} {v!r}: pass a positive int")
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.act = _activation(activation)
        self.field = ConvField(channels, depth, T, activation)
        self.out = nn.Linear(channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ConvResNet expects images [batch, channels, H, W], got shape {tuple(x.shape)}")
        z = self.blocks(self.act(self.inp(x)))
        return self.out(z.mean(dim=(2, 3)))
