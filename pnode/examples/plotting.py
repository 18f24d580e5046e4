"""Matplotlib on the Agg backend (no display needed), imported only when figures are drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path, name: str) -> str:
    """Save ``fig`` as ``out/name`` (PNG, 110 dpi), close it, return ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    pyplot().close(fig)
    return name
