"""PNG plots of the suite's results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import NullFormatter  # noqa: E402


def _sweep(rows: list[dict], key: str, fixed: dict) -> list[dict]:
    sel = [r for r in rows if all(r["problem"][k] == v for k, v in fixed.items())]
    return sorted(sel, key=lambda r: r["problem"][key])


def plot_all(results: dict, out: Path) -> list[Path]:
    """Write the timing sweeps and the memory plot into ``out``; return the files written."""
    written = []
    timing = results.get("timing")
    if timing:
        sweeps = [("steps", {"batch": 256, "width": 128}), ("batch", {"steps": 20, "width": 128}),
                  ("width", {"steps": 20, "batch": 256})]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (key, fixed) in zip(axes, sweeps, strict=True):
            rows = _sweep(timing, key, fixed)
            xs = [r["problem"][key] for r in rows]
            for cfg in rows[0]["seconds"]:
                ax.plot(xs, [r["seconds"][cfg] for r in rows], marker="o", label=cfg)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(key)
            ax.set_ylabel("seconds per iteration (median)")
            ax.set_title(f"time vs {key} ({', '.join(f'{k}={v}' for k, v in fixed.items())})")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out / "timing.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    memory = results.get("memory")
    if memory:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["problem"]["steps"] for r in memory]
        for cfg in memory[0]["memory"]:
            ax.plot(xs, [max(r["memory"][cfg]["mib"], 0.1) for r in memory], marker="o", label=cfg)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("steps")
        ax.set_ylabel("peak MiB above baseline")
        ax.set_title("memory of one iteration (batch 256, width 128)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
