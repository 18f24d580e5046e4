"""The shared training runner behind ``pnode run``: options, output folder, checkpoints, progress.

An example is an :class:`Example` subclass: it builds its data and model from a
resolved configuration, takes one optimisation step at a time, evaluates, and
draws its figures.  Everything else is done here, once for all examples:

- options: common ones (``--iters``, ``--seed``, ...) plus the example's own
  :class:`Option` list, with separate defaults for ``--quick``;
- the output folder: never clobbered without ``--overwrite``;
- checkpoints: model, optimizer, RNG states, iteration and loss history, written
  atomically (temporary file + :func:`os.replace`) and read back with
  ``torch.load(weights_only=True)``; ``--resume`` continues bit-for-bit;
- a tqdm progress bar with the loss, ``metrics.json`` and a loss-vs-time figure;
- MPI jobs (``mpirun -n N pnode run ...``): every rank trains on its shard of each
  batch (:meth:`Example.shard`, ODE solves on ``comm=``, other gradients summed by
  :class:`pnode.parallel.DataParallel`); rank 0 alone prints and writes files; every
  rank stops at the same iteration (:mod:`pnode.examples.distributed`);
- SIGINT / SIGTERM: the current iteration finishes, then the checkpoint is written,
  so that ``--resume`` repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .._petsc import inserted_options, is_number, option_value
from ..errors import CheckpointError
from .distributed import RunComm, StopRequest

__all__ = ["Example", "Option", "ExampleError", "UsageError", "CheckpointError", "ResumeError",
           "NotParallelError", "InterruptedRun", "RunResult",
           "run_example", "build_parser", "CHECKPOINT_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
_FORMAT = "pnode-example-checkpoint"
_FORMAT_VERSION = 1
# Options that may change between a run and its resumption (they do not change the training).
_RESUMABLE_CHANGES = {"iters", "checkpoint_every", "progress", "threads", "out", "eval_points"}


class ExampleError(Exception):
    """A user-facing problem with a ``pnode run`` invocation (bad option, output folder, ...)."""


class UsageError(ExampleError):
    """A command line that cannot describe a run: a bad option value, an unwritable ``--out``.

    ``pnode run`` exits with status 2 for it, as argparse does for a malformed flag.
    """


class InterruptedRun(ExampleError):
    """Training stopped by SIGINT / SIGTERM after writing the resumable checkpoint.

    ``pnode run`` exits with ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM),
    as a shell does for a job ended by that signal.
    """

    def __init__(self, message: str, signal_name: str | None) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        import signal

        sig = getattr(signal, self.signal_name or "SIGINT", signal.SIGINT)
        return 128 + int(sig)


class ResumeError(ExampleError, CheckpointError):
    """A checkpoint that cannot be used: unreadable, foreign, or from another configuration.

    Both an :class:`ExampleError` and a :class:`pnode.CheckpointError`.
    """


class NotParallelError(ExampleError):
    """An example without data decomposition started on more than one MPI rank (exit status 2)."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


@dataclass(frozen=True)
class Option:
    """One example-specific command-line option.

    Parameters
    ----------
    name : str
        Name with underscores; the flag is ``--name-with-dashes``.
    type : callable
        Converter (``int``, ``float``, ``str``).
    default : object
        Value of a full run.
    help : str
        One line for ``--help``.
    quick : object, optional
        Value under ``--quick`` (default: same as ``default``).
    choices : sequence, optional
        Allowed values.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    quick: Any = None
    choices: Sequence[Any] | None = None

    def value(self, quick: bool) -> Any:
        return self.quick if (quick and self.quick is not None) else self.default


_COMMON = (
    Option("iters", int, 1000, "training iterations (total, including resumed ones)", quick=60),
    Option("lr", float, 1e-3, "Adam learning rate"),
    Option("seed", int, 0, "seed of data, initialisation and mini-batches"),
    Option("dtype", str, "float64", "model and data precision (PETSc integrates in float64)",
           choices=("float64", "float32")),
    Option("checkpoint_every", int, 50, "write the checkpoint every N iterations (and at the end)",
           quick=20),
    Option("threads", int, 1, "torch threads (one is fastest for small models next to PETSc)"),
)


class Example(ABC):
    """One trainable example: data, model, optimiser, a training step, evaluation and figures.

    Subclasses set :attr:`name`, :attr:`summary` and :attr:`options`, build
    everything in ``__init__`` from ``config`` (the global torch RNG is seeded
    before), and keep all randomness of training in :attr:`generator` so that a
    resumed run repeats an uninterrupted one exactly.

    Data-parallel examples (:attr:`data_parallel` true) draw each batch from
    :attr:`generator` exactly as a serial run does (the same generator on every rank),
    keep :meth:`shard` of it, pass :attr:`solve_comm` as ``comm=`` to their solves,
    divide sums by the global batch size, call :meth:`reduce_gradients` before the
    optimizer step and return :meth:`global_sum` of their loss share.  With one rank
    all of these are the identity, so the serial run is the same code.

    Parameters
    ----------
    config : dict
        Resolved options (common and example-specific), by name.
    """

    #: command-line name, e.g. ``"cnf2d"``
    name: ClassVar[str] = ""
    #: one line for ``pnode run --list``
    summary: ClassVar[str] = ""
    #: example-specific options, and overrides of common defaults (same name replaces)
    options: ClassVar[tuple[Option, ...]] = ()
    #: whether the example trains data-parallel under ``mpirun -n N`` (N > 1)
    data_parallel: ClassVar[bool] = False
    #: why not, when :attr:`data_parallel` is false (shown to the user, who gets exit status 2)
    serial_reason: ClassVar[str] = "it has no data decomposition"

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.dtype = torch.float64 if config["dtype"] == "float64" else torch.float32
        self.generator = torch.Generator().manual_seed(int(config["seed"]) + 1)
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.run_comm: RunComm = _ACTIVE_COMM[-1] if _ACTIVE_COMM else _SERIAL
        self._serial_solves = False
        self._data_parallel: Any = None

    # -- data decomposition (identities on one rank) -----------------------------------
    @property
    def rank(self) -> int:
        """This process's rank in the job (0 in a serial run)."""
        return self.run_comm.rank

    @property
    def size(self) -> int:
        """Number of ranks training together (1 in a serial run)."""
        return self.run_comm.size

    @property
    def solve_comm(self) -> Any:
        """``comm=`` for training solves: the job's communicator, ``None`` when serial.

        ``None`` as well while the runner evaluates: evaluation and figures run
        the whole held-out set on every rank without communication.
        """
        return None if self._serial_solves else self.run_comm.comm

    def shard(self, data: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous part of ``data`` along ``dim`` (the first ranks get one more)."""
        if self.run_comm.comm is None:
            return data
        from ..parallel import shard_slice

        index = [slice(None)] * data.dim()
        index[dim] = shard_slice(data.shape[dim], self.rank, self.size)
        return data[tuple(index)]

    def global_sum(self, value: float) -> float:
        """Sum of ``value`` over ranks, identical on every rank (the serial value up to rounding)."""
        return self.run_comm.sum(value)

    def engine_reduced_parameters(self) -> list[torch.Tensor]:
        """Parameters whose gradients the engine sums (those of direct ``odeint(..., comm=)``).

        :class:`pnode.NeuralODE` blocks built with ``comm=self.solve_comm`` are found
        automatically; override this for funcs passed to ``pnode.odeint`` directly.
        """
        return []

    def reduce_gradients(self) -> None:
        """Sum the gradients of parameters outside collective solves over ranks (no-op serially)."""
        if self._data_parallel is not None:
            self._data_parallel.reduce_gradients()

    @abstractmethod
    def train_step(self, iteration: int) -> float:
        """One optimisation step; returns the training loss (before the update)."""

    @abstractmethod
    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics of the current model (numbers, or lists of numbers: they go to JSON)."""

    def figures(self, out: Path) -> list[str]:
        """Write the example's PNG figures into ``out``; return their file names."""
        return []

    def extra_state(self) -> dict[str, Any]:
        """Tensors or primitives to checkpoint besides model, optimizer and RNGs."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        return None


_SERIAL = RunComm.__new__(RunComm)
_SERIAL.comm, _SERIAL.rank, _SERIAL.size = None, 0, 1
# the RunComm of the run being set up (read by Example.__init__; a stack for nested runs)
_ACTIVE_COMM: list[RunComm] = []


@dataclass
class RunResult:
    """What one ``pnode run`` produced."""

    out: Path
    metrics: dict[str, Any]
    losses: list[float]
    resumed_from: int


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------
def _all_options(cls: type[Example]) -> dict[str, Option]:
    opts = {o.name: o for o in _COMMON}
    opts.update({o.name: o for o in cls.options})
    return opts


def build_parser(cls: type[Example], prog: str = "pnode run") -> argparse.ArgumentParser:
    """The argument parser of one example (common flags, then the example's options)."""
    p = argparse.ArgumentParser(
        prog=f"{prog} {cls.name}", description=cls.summary, allow_abbrev=False,
        epilog="Arguments with a single dash (-pnode_ts_adapt_type dsp, -log_view, ...) are "
               "PETSc options; pnode's solvers read those with the prefix -pnode_.")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: runs/{cls.name})")
    p.add_argument("--quick", action="store_true", help="a small configuration (< 1 minute)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into a non-empty output folder (replaces pnode's files)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (options default to its values)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar")
    for o in _all_options(cls).values():
        flag = "--" + o.name.replace("_", "-")
        default = o.default if o.quick is None else f"{o.default}, --quick: {o.quick}"
        p.add_argument(flag, dest=o.name, type=o.type, default=None, choices=o.choices,
                       help=f"{o.help} (default: {default})")
    return p


def split_petsc_options(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Separate PETSc options (single dash: ``-name [value]``) from the example's arguments.

    A token after a PETSc option is its value unless it starts with ``-`` and is not a
    number; ``--flags`` and ``-h`` stay with the example.
    """
    rest: list[str] = []
    petsc: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and not a.startswith("--") and a != "-h" and not is_number(a) \
                and len(a) > 1:
            value = option_value(argv, i)
            petsc[a[1:]] = "" if value is None else value
            i += 1 if value is None else 2
        else:
            rest.append(a)
            i += 1
    return rest, petsc


def _resolve(cls: type[Example], ns: argparse.Namespace,
             saved: Mapping[str, Any] | None) -> dict[str, Any]:
    """Explicit flags win; then the checkpoint's values (on resume); then (quick) defaults."""
    quick = bool(ns.quick) if saved is None else bool(saved.get("quick", False)) or bool(ns.quick)
    cfg: dict[str, Any] = {"quick": quick}
    for name, o in _all_options(cls).items():
        given = getattr(ns, name)
        if given is not None:
            cfg[name] = given
        elif saved is not None and name in saved:
            cfg[name] = saved[name]
        else:
            cfg[name] = o.value(quick)
    for name in ("iters", "checkpoint_every", "threads"):
        # a count that cannot describe a run is a usage error (exit status 2), as --lr nan is
        least = 0 if name == "checkpoint_every" else 1
        if cfg[name] < least:
            need = "must be positive" if least else "must be 0 (off) or positive"
            raise UsageError(f"Invalid --{name.replace('_', '-')} {cfg[name]}: {need}")
    for name, o in _all_options(cls).items():
        v = cfg[name]
        if o.type is float and isinstance(v, float) and not math.isfinite(v):
            # argparse's float() accepts "nan" and "inf"; no example option means either
            raise UsageError(f"Invalid --{name.replace('_', '-')} {v}: pass a finite number")
    if isinstance(cfg.get("lr"), float) and not cfg["lr"] > 0:
        raise UsageError(f"Invalid --lr {cfg['lr']}: the learning rate must be positive")
    if saved is not None:
        changed = sorted(k for k in cfg if k not in _RESUMABLE_CHANGES and k in saved
                         and k != "quick" and cfg[k] != saved[k])
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} -> {cfg[k]!r}" for k in changed)
            raise ResumeError(f"--resume with options that change the training ({diffs}); "
                                  "drop them, or start a new run in another --out")
    return cfg


# ---------------------------------------------------------------------------------------
# Output folder and files
# ---------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _training_state(example: Example) -> dict[str, Any]:
    """Model, optimizer, extra state and RNGs: what one iteration changes."""
    return {"model": example.model.state_dict(), "optimizer": example.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": example.generator.get_state()},
            "extra": example.extra_state()}


def _copy(obj: Any) -> Any:
    """A copy of a checkpointable tree (tensors, dicts, lists, tuples, primitives)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj  # numbers, strings, None: immutable


def _snapshot(example: Example) -> dict[str, Any]:
    """A private copy of :func:`_training_state`, taken before an iteration changes anything.

    A hard interrupt (a second Ctrl-C) can land anywhere in an iteration, e.g. between
    the optimizer's update of its moments and of the parameters; the checkpoint then
    holds this copy, i.e. exactly the state after the previous iteration.  The state
    is what a checkpoint stores (loadable with ``weights_only=True``), so copying its
    tensors and containers copies all of it; it costs about 1 ms for the bundled examples
    (2 % of a ``digits`` iteration), several times less than ``copy.deepcopy``.
    """
    return _copy(_training_state(example))


def save_checkpoint(path: Path, example: Example, iteration: int, history: Mapping[str, list],
                    state: Mapping[str, Any] | None = None) -> None:
    """Write the training state atomically (only tensors and primitive containers).

    ``state``: a :func:`_snapshot` to write instead of the example's current state.
    """
    full = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "example": example.name,
        "config": {k: v for k, v in example.config.items() if k != "out"},
        "iteration": int(iteration),
        **(state if state is not None else _training_state(example)),
        "history": {k: list(v) for k, v in history.items()},
    }
    _atomic_write(path, lambda p: torch.save(full, p))


def load_checkpoint(path: Path, name: str) -> dict[str, Any]:
    """Read and validate a checkpoint of example ``name``; raise :class:`ResumeError`."""
    if path.is_file() and path.stat().st_size == 0:
        raise ResumeError(f"checkpoint {path} is empty (0 bytes: a copy or a disk that failed); it "
                              "was left as it is (start a new run in another --out, or use --overwrite "
                              "to replace it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or unsafe file
        raise ResumeError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e, 200)}. "
            "The file is damaged or not a pnode checkpoint; it was left as it is (start a new run "
            "in another --out, or use --overwrite to replace it)") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ResumeError(f"{path} is not a pnode example checkpoint (no '{_FORMAT}' marker); "
                              "it was left as it is")
    if state.get("version") != _FORMAT_VERSION:
        raise ResumeError(f"{path} has checkpoint format version {state.get('version')!r}, "
                              f"this pnode reads version {_FORMAT_VERSION}")
    if state.get("example") != name:
        raise ResumeError(f"{path} is a checkpoint of example {state.get('example')!r}, "
                              f"not {name!r}")
    for key in ("config", "iteration", "model", "optimizer", "rng", "history"):
        if key not in state:
            raise ResumeError(f"{path} lacks '{key}': incomplete checkpoint")
    return state


def _check_writable(out: Path) -> None:
    """Refuse an output folder (or the parent it would be created in) that cannot be written.

    Tried, not inferred from permission bits: ``os.access`` says yes to root on a
    read-only mount or a 0o555 folder, and the run would fail only at its first checkpoint.
    """
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, not a folder; choose another --out")
    try:
        fd, name = tempfile.mkstemp(prefix=".pnode-probe-", dir=probe)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write to {probe} ({e.strerror or type(e).__name__}); "
                         "choose another --out") from None
    os.close(fd)
    os.unlink(name)


def _prepare_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    _check_writable(out)
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise ExampleError(f"--resume: no {CHECKPOINT_NAME} in {out}; run without --resume first")
        return
    if out.exists() and not out.is_dir():
        raise ExampleError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExampleError(f"--out {out} is not empty; pass --overwrite to replace its pnode files, "
                           "--resume to continue its run, or choose another folder")


def _write_json(path: Path, obj: Any) -> None:
    def write(p: Path) -> None:
        with open(p, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=True)
            fh.write("\n")

    _atomic_write(path, write)


def _loss_figure(out: Path, history: Mapping[str, list], name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    loss = history["loss"]
    axes[0].plot(range(1, len(loss) + 1), loss, lw=1)
    axes[0].set_xlabel("iteration")
    axes[1].plot(history["time"], loss, lw=1)
    axes[1].set_xlabel("training time [s]")
    for ax in axes:
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if min(loss) > 0 and max(loss) / min(loss) > 20:
            ax.set_yscale("log")
    fig.suptitle(f"pnode run {name}")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return "loss.png"


def _versions() -> dict[str, str]:
    from petsc4py import PETSc

    import pnode

    return {"pnode": pnode.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "PETSc": ".".join(map(str, PETSc.Sys.getVersion()))}


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def run_example(cls: type[Example], argv: Sequence[str] = (), *,
                out_default: Path | None = None, comm: Any = None) -> RunResult:
    """Parse ``argv`` for example ``cls``, train, evaluate and write the outputs.

    Under ``mpirun -n N`` every rank calls this together: each trains on its shard
    of every batch, rank 0 alone prints and writes the output folder, and every
    rank returns the same :class:`RunResult`.

    Parameters
    ----------
    cls : type of Example
        The example.
    argv : sequence of str
        Command-line arguments after the example name (example flags and PETSc options).
    out_default : Path, optional
        Output folder when ``--out`` is not given (default ``runs/<name>``).
    comm : mpi4py communicator, optional
        The ranks that train together (default ``MPI.COMM_WORLD``).

    Returns
    -------
    RunResult
        Output folder, metrics and the loss of every iteration.

    Raises
    ------
    ExampleError
        Bad options, a non-empty output folder without ``--overwrite``, a
        checkpoint that cannot be used (:class:`ResumeError`), an interrupt
        (after writing the checkpoint), a failure on another rank, or
        :class:`NotParallelError` for an example without data decomposition on more than
        one rank.  Nothing in the output folder is changed in the first three cases.
    SystemExit
        From argparse, for an unknown flag (the message lists the valid ones).
    """
    rc = RunComm(comm)
    if rc.size > 1 and not cls.data_parallel:
        raise NotParallelError(f"example {cls.name!r} cannot train data-parallel: {cls.serial_reason}; "
                               f"run it on one rank (this MPI job has {rc.size})")
    rest, petsc = split_petsc_options(list(argv))
    parser = build_parser(cls)
    ns, unknown = parser.parse_known_args(rest)
    if unknown:
        valid = sorted(a for a in parser._option_string_actions if a.startswith("--"))
        parser.error(f"unknown option(s) {' '.join(unknown)} for example {cls.name!r}; "
                     f"valid: {' '.join(valid)}")
    out = ns.out or out_default or Path("runs") / cls.name

    def prepare() -> dict[str, Any] | None:
        _prepare_out(out, overwrite=ns.overwrite, resume=ns.resume)
        return load_checkpoint(out / CHECKPOINT_NAME, cls.name) if ns.resume else None

    saved = rc.on_root(prepare)  # read once, sent to every rank: they resume identically
    cfg = _resolve(cls, ns, None if saved is None else saved["config"])
    cfg["progress"] = ns.progress
    with inserted_options(petsc, override=True):  # for the run, then restored
        return _train(cls, cfg, out, saved, petsc, rc)


class _serial_solves:
    """Evaluation: every rank solves the whole held-out set alone (``comm=None`` everywhere)."""

    def __init__(self, example: Example) -> None:
        self.example, self.saved = example, []

    def __enter__(self) -> None:
        self.example._serial_solves = True
        for m in self.example.model.modules():
            kw = getattr(m, "odeint_kwargs", None)
            if isinstance(kw, dict) and kw.get("comm") is not None:
                self.saved.append((kw, kw["comm"]))
                kw["comm"] = None

    def __exit__(self, *exc: object) -> None:
        self.example._serial_solves = False
        for kw, c in self.saved:
            kw["comm"] = c
        self.saved.clear()


def _build(cls: type[Example], cfg: dict[str, Any], rc: RunComm) -> Example:
    torch.manual_seed(int(cfg["seed"]))
    _ACTIVE_COMM.append(rc)
    try:
        example = cls(cfg)
    finally:
        _ACTIVE_COMM.pop()
    if rc.comm is not None:
        from ..parallel import DataParallel

        rng = torch.get_rng_state()  # DataParallel seeds torch; a serial run has no such call
        example._data_parallel = DataParallel(example.model, rc.comm, seed=int(cfg["seed"]),
                                              reduced=example.engine_reduced_parameters())
        torch.set_rng_state(rng)
    return example


def _restore(example: Example, saved: Mapping[str, Any], out: Path) -> None:
    try:
        example.model.load_state_dict(saved["model"])
        example.optimizer.load_state_dict(saved["optimizer"])
        example.load_extra_state(saved.get("extra", {}))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"checkpoint in {out} does not fit this model: "
                              f"{_first_line(e)}") from None
    torch.set_rng_state(saved["rng"]["torch"])
    example.generator.set_state(saved["rng"]["generator"])


def _interrupted(cls: type[Example], it: int, ckpt: Path, out: Path, how: str) -> InterruptedRun:
    return InterruptedRun(f"interrupted after iteration {it} ({how}); checkpoint written to {ckpt}, "
                          f"continue with: pnode run {cls.name} --out {out} --resume",
                          how if how.startswith("SIG") else None)


def _step(example: Example, it: int, stop: StopRequest) -> tuple[float, BaseException | None]:
    """Iteration ``it``: its loss, or the error to agree on with the other ranks."""
    try:
        loss = float(example.train_step(it))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # agreed with the other ranks by the caller, then re-raised
        if stop.count > 1:  # a second signal, turned into an error by a PETSc callback
            raise KeyboardInterrupt from None
        return math.nan, e
    if not math.isfinite(loss):
        return loss, ExampleError(f"the training loss is {loss} at iteration {it + 1}; "
                                  "lower --lr or change the solver options")
    return loss, None


def _train(cls: type[Example], cfg: dict[str, Any], out: Path, saved: Mapping[str, Any] | None,
           petsc: Mapping[str, str], rc: RunComm) -> RunResult:
    from tqdm.auto import tqdm

    torch.set_num_threads(int(cfg["threads"]))
    example = _build(cls, cfg, rc)
    history: dict[str, list] = {"loss": [], "time": []}
    start = 0
    if saved is not None:
        _restore(example, saved, out)
        history = {k: list(v) for k, v in saved["history"].items()}
        start = int(saved["iteration"])
    ckpt = out / CHECKPOINT_NAME

    def checkpoint(iteration: int, state: Mapping[str, Any] | None = None) -> None:
        if rc.root:
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, example, iteration, history, state)

    iters, every = int(cfg["iters"]), int(cfg["checkpoint_every"])
    t_offset = history["time"][-1] if history["time"] else 0.0
    bar = tqdm(total=iters, initial=min(start, iters), desc=cls.name,
               disable=not (cfg["progress"] and rc.root), dynamic_ncols=True, leave=True)
    t0 = time.perf_counter()
    it = start
    with StopRequest() as stop:
        snap: tuple[int, dict[str, Any]] | None = None
        try:
            while it < iters:
                # the state after iteration `it`: what a hard interrupt inside the next one writes
                snap = (it, _snapshot(example))
                loss, error = _step(example, it, stop)
                halt, failure = rc.agree(stop.requested, error)
                if failure is not None:
                    if error is not None:
                        raise error
                    raise ExampleError(f"training stopped at iteration {it + 1} because it failed on "
                                       f"{failure}")
                history["loss"].append(loss)
                history["time"].append(t_offset + time.perf_counter() - t0)
                it += 1
                snap = None  # from here on the example's own state is that of iteration `it`
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                if halt:
                    checkpoint(it)
                    bar.close()
                    raise _interrupted(cls, it, ckpt, out, stop.signal_name or "stop requested")
                if every and it % every == 0 and it < iters:
                    checkpoint(it)
        except KeyboardInterrupt:
            state = None
            if snap is not None:  # interrupted inside an iteration: write the state before it
                it, state = snap
                for v in history.values():
                    del v[it:]
            checkpoint(it, state)
            bar.close()
            raise _interrupted(cls, it, ckpt, out, stop.signal_name or "KeyboardInterrupt") from None
    bar.close()
    if it > start or not ckpt.exists() or saved is None:
        checkpoint(it)

    def finish() -> dict[str, Any]:
        return _finish(cls, example, cfg, out, history, it, start, petsc)

    result = rc.on_root(finish)
    return RunResult(out=out, metrics=result, losses=list(history["loss"]), resumed_from=start)


def _finish(cls: type[Example], example: Example, cfg: Mapping[str, Any], out: Path,
            history: Mapping[str, list], it: int, start: int, petsc: Mapping[str, str]) -> dict[str, Any]:
    """Rank 0: evaluate (serial solves), draw the figures, write ``metrics.json``."""
    import pnode

    with _serial_solves(example):
        t_eval = time.perf_counter()
        metrics = example.evaluate()
        eval_seconds = time.perf_counter() - t_eval
        out.mkdir(parents=True, exist_ok=True)
        figures = [_loss_figure(out, history, cls.name)] if history["loss"] else []
        figures += example.figures(out)
    stats = pnode.last_stats()
    result = {
        "example": cls.name,
        "iterations": it,
        "resumed_from": start,
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "train_seconds": history["time"][-1] if history["time"] else 0.0,
        "eval_seconds": eval_seconds,
        "metrics": metrics,
        "config": {k: v for k, v in cfg.items() if k != "progress"},
        "petsc_options": dict(petsc),
        "ranks": example.size,
        "last_solve": None if stats is None else {
            "method": stats.method, "steps": stats.steps, "rejected": stats.rejected,
            "rhs_evals": stats.rhs_evals, "vjps": stats.vjps,
            "forward_seconds": stats.forward_seconds, "adjoint_seconds": stats.adjoint_seconds},
        "figures": figures,
        "checkpoint": CHECKPOINT_NAME,
        "versions": _versions(),
    }
    _write_json(out / METRICS_NAME, result)
    return result
