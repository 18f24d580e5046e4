"""Classifiers with an ODE block: ``features -> y(0) -> ODE -> y(T) -> logits`` (ODE-Net style)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..neural_ode import NeuralODE

__all__ = ["ConvField", "ODEClassifier"]


class ConvField(nn.Module):
    """A convolutional vector field on ``[batch, channels, H, W]`` with time as an extra channel.

    Parameters
    ----------
    channels : int
        Feature channels of the state.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def _with_t(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, t.to(h.dtype).expand(h.shape[0], 1, *h.shape[2:])], dim=1)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(self._with_t(t, h)))
        return self.c2(self._with_t(t, h))


class _TimeTanhMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        tt = t.to(h.dtype).expand(h.shape[0], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([h, tt], dim=1))))


class ODEClassifier(nn.Module):
    """Image classifier: an encoder, one :class:`pnode.NeuralODE` block, a linear head.

    Parameters
    ----------
    image_shape : tuple of int
        ``(channels, H, W)`` of the input images.
    n_classes : int
        Number of classes.
    arch : {"mlp", "conv"}
        ``"mlp"``: flatten, linear to ``width`` features, an MLP field; ``"conv"``:
        a 3x3 convolution to ``width`` channels and a :class:`ConvField`.
    width : int
        Feature width (``"mlp"``) or channels (``"conv"``) of the ODE state.
    hidden : int
        Hidden width of the MLP field.
    T : float
        Integration time of the ODE block.
    **odeint_kwargs
        Options of :func:`pnode.odeint`, e.g. ``method="rk4", options={"step_size": 0.25}``.

    Examples
    --------
    >>> model = ODEClassifier((1, 8, 8), 10, arch="mlp", method="rk4",
    ...                       options={"step_size": 0.25}).double()
    >>> logits = model(images)          # images [batch, 1, 8, 8]
    """

    def __init__(self, image_shape: tuple[int, int, int], n_classes: int, *, arch: str = "mlp",
                 width: int = 32, hidden: int = 64, T: float = 1.0, **odeint_kwargs: Any) -> None:
        super().__init__()
        c, h, w = image_shape
        if arch == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.Tanh())
            field: nn.Module = _TimeTanhMLP(width, hidden)
            self.head = nn.Linear(width, n_classes)
        elif arch == "conv":
            self.encoder = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.Tanh())
            field = ConvField(width)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes))
        else:
            raise ValueError(f"Invalid arch {arch!r}; valid: 'mlp', 'conv'")
        self.arch = arch
        self.ode = NeuralODE(field, t=(0.0, float(T)), **odeint_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n_classes]`` for images ``[batch, c, H, W]``."""
        return self.head(self.ode(self.encoder(x)))
