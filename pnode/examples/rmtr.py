"""``pnode run rmtr``: multilevel trust-region (RMTR) training of a forward-Euler ResNet on digits.

The network is :class:`pnode.multilevel.ResNet` (``depth`` residual blocks, one
forward-Euler ``pnode.odeint`` solve); :class:`pnode.multilevel.RMTR` trains it
with a hierarchy of ``--levels`` networks of depth ``depth / 2**l`` (Kopaničáková &
Krause, SIAM J. Sci. Comput. 45(3), 2023).  One runner iteration is one RMTR
iteration (a V-cycle, or a step of the F-cycle's nested iteration), so
checkpoints, ``--resume`` and interrupts work as for every other example; the
checkpoint holds the whole RMTR state (levels, radii, L-SR1 memories, batch
schedule and its generator).  Under ``mpirun -n N`` each rank holds a contiguous
shard of the training set; losses and gradients are reduced so that every rank
takes the decisions and steps of a serial run over the full batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..multilevel import RMTR, ResNet
from .datasets import split, tabular
from .plotting import pyplot, save
from .runner import Example, Option

__all__ = ["DigitsRMTR"]


class DigitsRMTR(Example):
    """A forward-Euler ResNet classifier on the 8x8 digits, trained by RMTR."""

    name = "rmtr"
    summary = "multilevel trust-region (RMTR) training of a forward-Euler ResNet on the 8x8 digits"
    data_parallel = True
    options = (
        Option("iters", int, 150, "RMTR iterations (V-cycles / nested-iteration steps)", quick=12),
        Option("levels", int, 3, "levels of the depth hierarchy (1: single-level trust region)",
               quick=2),
        Option("depth", int, 32, "residual blocks of the finest network (divisible by 2**(levels-1))",
               quick=8),
        Option("width", int, 16, "width of the residual blocks", quick=8),
        Option("T", float, 1.0, "integration time of the blocks (step T / depth)"),
        Option("cycle", str, "F", "F: nested iteration from the coarsest level; V: V-cycles only",
               choices=("F", "V")),
        Option("batch", int, 0, "initial mini-batch (0: full batch, deterministic)"),
        Option("radius", float, 0.5, "initial trust-region radius"),
        Option("memory", int, 5, "L-SR1 pairs per level"),
        Option("test_fraction", float, 0.25, "held-out fraction"),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        c = self.config
        x, y = tabular("digits")
        x = (x / 16.0).reshape(len(x), -1)
        tr, te = split(len(x), c["test_fraction"], generator=torch.Generator().manual_seed(int(c["seed"])))
        self.xtr, self.ytr = x[tr].to(self.dtype), y[tr]
        self.xte, self.yte = x[te].to(self.dtype), y[te]
        self.model = ResNet(x.shape[1], c["width"], c["depth"], 10, T=c["T"]).to(self.dtype)
        options: dict[str, Any] = {"cycle": c["cycle"], "radius": c["radius"], "memory": c["memory"],
                                   "seed": int(c["seed"]), "progress": False}
        if c["batch"] > 0:
            options["batch_size"] = c["batch"]
        try:
            self.rmtr = RMTR(self.model, nn.CrossEntropyLoss(), levels=c["levels"],
                             comm=self.run_comm.comm, **options)
        except ValueError as e:
            from .runner import ExampleError

            raise ExampleError(str(e)) from None
        # each rank: its contiguous shard of the training set (RMTR reduces over the ranks)
        self.rmtr.start(self.shard(self.xtr), self.shard(self.ytr))
        # the runner checkpoints `optimizer.state_dict()`: RMTR's is the whole multilevel state
        self.optimizer = self.rmtr  # type: ignore[assignment]

    def train_step(self, iteration: int) -> float:
        self.rmtr.step()
        return self.rmtr.history.loss[-1]

    def evaluate(self) -> dict[str, Any]:
        hist = self.rmtr.finish()  # the finest network with the current parameters
        self._hist = hist
        with torch.no_grad():
            logits = self.model(self.xte)
            train_logits = self.model(self.xtr)
        return {"test_accuracy": float((logits.argmax(1) == self.yte).double().mean()),
                "test_loss": float(nn.functional.cross_entropy(logits, self.yte)),
                "train_loss": float(nn.functional.cross_entropy(train_logits, self.ytr)),
                "train_accuracy": float((train_logits.argmax(1) == self.ytr).double().mean()),
                "final_radius": hist.radius[-1] if hist.radius else None,
                "iterations_per_level": [hist.level.count(l) for l in range(self.rmtr.n_levels)],
                "work_units": hist.work[-1] if hist.work else 0.0,
                "n_train": len(self.xtr), "n_test": len(self.xte)}

    def figures(self, out: Path) -> list[str]:
        hist = getattr(self, "_hist", None) or self.rmtr.history
        if not hist.loss:
            return []
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        levels = self.rmtr.n_levels
        for l in range(levels):
            ts = [t for t, lv in zip(hist.time, hist.level, strict=True) if lv == l]
            vs = [v for v, lv in zip(hist.loss, hist.level, strict=True) if lv == l]
            if ts:
                axes[0].semilogy(ts, vs, ".-", ms=3, lw=1, label=f"level {l} acting as finest")
        axes[0].set_xlabel("training time [s]")
        axes[0].set_ylabel("training loss (finest network)")
        axes[0].legend(fontsize=8)
        for l in range(levels):
            axes[1].semilogy(hist.time, [r[l] for r in hist.radii], lw=1,
                             label=f"level {l} (depth {self.rmtr.levels[l].model.depth})"
                             if hasattr(self.rmtr.levels[l].model, "depth") else f"level {l}")
        axes[1].set_xlabel("training time [s]")
        axes[1].set_ylabel("trust-region radius")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(f"RMTR, {levels} levels, depth {self.config['depth']}, cycle {self.config['cycle']}")
        return [save(fig, out, "rmtr.png")]
