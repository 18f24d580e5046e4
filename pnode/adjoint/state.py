"""Flattening of tensor and tuple-of-tensor states into one vector and back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["StateSpec"]


@dataclass(frozen=True)
class StateSpec:
    """Shapes of a (possibly tuple) state, and how it maps to one flat vector.

    The engine integrates one flat float64 vector; ``func`` sees the state in
    the user's structure and dtype.
    """

    shapes: tuple[torch.Size, ...]
    is_tuple: bool
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_state(cls, y0: torch.Tensor | Sequence[torch.Tensor]) -> StateSpec:
        tensors = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
        dtypes = {x.dtype for x in tensors}
        if len(dtypes) != 1:
            raise ValueError(
                f"all tensors of a tuple state must share one dtype, got {sorted(map(str, dtypes))}"
            )
        return cls(
            shapes=tuple(x.shape for x in tensors),
            is_tuple=isinstance(y0, (tuple, list)),
            dtype=tensors[0].dtype,
            device=tensors[0].device,
        )

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, y: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate a state into one 1-D tensor (no copy for a single tensor)."""
        if not self.is_tuple:
            return y.reshape(-1)
        return torch.cat([x.reshape(-1) for x in y])

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Views of ``flat`` in the state's structure (leading dims of ``flat`` kept)."""
        lead = tuple(flat.shape[:-1])
        # shapes as one tuple argument: a 0-d state would otherwise call view() with no size
        if not self.is_tuple:
            return flat.view(lead + tuple(self.shapes[0]))
        parts = torch.split(flat, self.numels, dim=-1)
        return tuple(p.view(lead + tuple(s)) for p, s in zip(parts, self.shapes, strict=True))

    def check_output(self, out: object, where: str) -> torch.Tensor:
        """Validate ``func``'s output against the state structure and flatten it."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if isinstance(out, (tuple, list)) != self.is_tuple or len(outs) != len(self.shapes):
            raise ValueError(
                f"{where} returned {_describe(out)}, but the state is {self._describe_spec()}; "
                "func(t, y) must return dy/dt with the structure of y"
            )
        for i, (o, s) in enumerate(zip(outs, self.shapes, strict=True)):
            if not isinstance(o, torch.Tensor):
                raise ValueError(f"{where} returned a {type(o).__name__} (part {i}), not a Tensor")
            if o.shape != s:
                raise ValueError(
                    f"{where} returned shape {tuple(o.shape)} for state part {i} of shape "
                    f"{tuple(s)}; dy/dt must have the shape of y"
                )
            if o.dtype != self.dtype:
                raise ValueError(
                    f"{where} returned dtype {o.dtype} for a state of dtype {self.dtype}; "
                    "return dy/dt in the dtype of y"
                )
        return outs[0].reshape(-1) if not self.is_tuple else torch.cat([o.reshape(-1) for o in outs])

    def _describe_spec(self) -> str:
        if self.is_tuple:
            return "a tuple of shapes " + ", ".join(str(tuple(s)) for s in self.shapes)
        return f"a Tensor of shape {tuple(self.shapes[0])}"


def _describe(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return f"a Tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"
