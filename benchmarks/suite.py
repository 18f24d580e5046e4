"""The whole benchmark suite of issue 5: run every section, print and save tables, plots and JSON.

``python -m benchmarks [--quick] [--out DIR] [--only SECTION ...]``; see
:mod:`benchmarks.timing`, :mod:`benchmarks.memory`, :mod:`benchmarks.accuracy`,
:mod:`benchmarks.stiff`, :mod:`benchmarks.profile` and :mod:`benchmarks.small` for what each
measures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks import accuracy, memory, profile, small, stiff, timing
from benchmarks.common import machine_info

SECTIONS = {"timing": timing, "memory": memory, "accuracy": accuracy, "stiff": stiff, "profile": profile,
            "small": small}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def header(info: dict, quick: bool) -> str:
    """Markdown header naming the machine, date, versions and thread count."""
    return (f"## pnode benchmark suite{' (quick)' if quick else ''}\n\n"
            f"{info['date']} on {info['machine']} ({info['cpu']}, {info['cores']} cores, 1-min load "
            f"{info['load_average_1min']:.1f}); Python {info['python']}, torch {info['torch']}, PETSc "
            f"{info['petsc']}, petsc4py {info['petsc4py']}, torchdiffeq {info['torchdiffeq']}; "
            f"{info['torch_threads']} torch thread. Medians over repeats; every ratio is taken within "
            "this run.")


def _clean(obj):
    """JSON-safe copy: non-finite floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def run(quick: bool = False, out: Path = DEFAULT_OUT, only: list[str] | None = None,
        plots: bool = True) -> dict:
    """Run the selected sections, print their tables, write ``tables.md``, ``results.json`` and PNGs.

    Parameters
    ----------
    quick : bool
        Smaller sizes and fewer repeats (about 1-2 minutes on an idle 2-core machine).
    out : Path
        Output directory (created).
    only : list of str, optional
        Section names to run (default: all of ``SECTIONS``).
    plots : bool
        Write PNG plots.

    Returns
    -------
    dict
        ``{"machine": ..., "seconds": {...}, section name: raw results}``.
    """
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    results: dict = {"machine": info, "quick": quick, "seconds": {}}
    parts = [header(info, quick)]
    print(parts[0] + "\n", flush=True)
    start = time.perf_counter()
    for name in only or list(SECTIONS):
        mod = SECTIONS[name]
        s = time.perf_counter()
        try:
            results[name] = mod.run(quick)
            text = mod.tables(results[name])
        except Exception as exc:  # one broken section must not lose the others' results
            results[name] = None
            text = f"### {name}: failed\n\n{type(exc).__name__}: {exc}"
        results["seconds"][name] = time.perf_counter() - s
        parts.append(text)
        print(text + "\n", flush=True)
    results["seconds"]["total"] = time.perf_counter() - start
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items())
    parts.append(f"Suite wall time: {secs}.")
    print(parts[-1])
    (out / "tables.md").write_text("\n\n".join(parts) + "\n")
    (out / "results.json").write_text(json.dumps(_clean(results), indent=1))
    if plots:
        from benchmarks.plots import plot_all

        results["plots"] = [str(p) for p in plot_all(results, out)]
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    args = ap.parse_args(argv)
    run(args.quick, args.out, args.only)
