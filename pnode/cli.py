"""The ``pnode`` command.

``pnode info``
    versions, PETSc build (MPI or not), COMM_WORLD size, the method table.
``pnode run <example> [--quick] [--out DIR] [--overwrite] [--resume] [options] [PETSc options]``
    train one of the bundled examples (``pnode run --list`` lists them,
    ``pnode run <example> --help`` shows its options).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading

__all__ = ["main", "environment"]


def environment() -> dict[str, str]:
    """Versions and build facts of the stack pnode runs on.

    Returns
    -------
    dict
        pnode, Python, torch, PETSc, petsc4py, MPI library and COMM_WORLD size,
        PETSc scalar type, precision and index size, and whether PETSc has real MPI.
    """
    import petsc4py
    import torch
    from mpi4py import MPI
    from petsc4py import PETSc

    import pnode

    cfg = petsc4py.get_config()
    conf_h = os.path.join(cfg["PETSC_DIR"], cfg.get("PETSC_ARCH") or "", "include", "petscconf.h")
    try:
        with open(conf_h) as fh:
            mpiuni = "PETSC_HAVE_MPIUNI" in fh.read()
    except OSError:
        mpiuni = None
    scalar = PETSc.ScalarType
    return {
        "pnode": pnode.__version__,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "PETSc": ".".join(map(str, PETSc.Sys.getVersion())),
        "petsc4py": petsc4py.__version__,
        "PETSC_DIR": cfg["PETSC_DIR"] + (("/" + cfg["PETSC_ARCH"]) if cfg.get("PETSC_ARCH") else ""),
        "PETSc MPI": "MPIUNI (no MPI!)" if mpiuni else ("MPI" if mpiuni is False else "unknown"),
        "MPI library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi4py": __import__("mpi4py").__version__,
        "COMM_WORLD size": str(PETSc.COMM_WORLD.getSize()),
        "scalar type": f"{'complex' if 'complex' in str(scalar) else 'real'} "
        f"({__import__('numpy').dtype(scalar).name})",
        "precision": __import__("numpy").dtype(PETSc.RealType).name,
        "index size": f"{__import__('numpy').dtype(PETSc.IntType).itemsize * 8}-bit",
    }


def _method_table() -> str:
    import pnode

    rows = [("name", "PETSc", "order", "adaptive", "implicit", "IMEX")]
    for m in pnode.methods():
        rows.append((m.name, m.petsc, str(m.order), "yes" if m.adaptive else "no",
                     "yes" if m.implicit else "no", "yes" if m.imex else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    env = environment()
    width = max(map(len, env))
    for k, v in env.items():
        print(f"{k.ljust(width)}  {v}")
    print()
    print(_method_table())
    return 0 if "MPIUNI" not in env["PETSc MPI"] else 1


def _example_list() -> str:
    from .examples import EXAMPLES

    width = max(map(len, EXAMPLES))
    return "\n".join(f"  {name.ljust(width)}  {cls.summary}" for name, cls in EXAMPLES.items())


_SIGNALLED: list[int] = []  # the signal that interrupted `pnode run` outside its training loop


def _raise_interrupt(signum: int, frame: object) -> None:
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _petsc_reason(e: BaseException) -> str:
    """One line from a PETSc error: its most specific message, without the call stack."""
    import re

    lines = [re.sub(r"^\[\d+\]\s*", "", ln).strip() for ln in str(e).splitlines()]
    trace = re.compile(r"^\w+\(\) at |^error code \d+$|^Unknown type\. Check for miss-spelling")
    useful = [ln for ln in lines if ln and not trace.match(ln)]
    code = getattr(e, "ierr", None)
    where = f" (PETSc error code {code})" if code is not None else ""
    return (useful[-1] if useful else (lines[0] if lines and lines[0] else "unknown PETSc error")) + where


_RUN_USAGE = ("usage: pnode run <example> [--quick] [--out DIR] [--overwrite] [--resume] "
              "[example options] [PETSc options]")


def _cmd_run(argv: list[str]) -> int:
    from .examples import EXAMPLES, ExampleError, run

    if not argv or argv[0] in ("-h", "--help", "--list"):
        out = sys.stdout if argv else sys.stderr
        print(_RUN_USAGE, file=out)
        print("\nexamples (pnode run <example> --help shows its options):", file=out)
        print(_example_list(), file=out)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in EXAMPLES:
        print(f"{_RUN_USAGE}\npnode run: error: unknown example {name!r}; valid: {', '.join(EXAMPLES)}",
              file=sys.stderr)
        return 2
    from petsc4py import PETSc

    import pnode

    from .examples import InterruptedRun, NotParallelError, UsageError
    from .examples.distributed import RunComm

    root = RunComm().root  # under mpirun, messages and the summary come from rank 0 only

    def fail(message: str, status: int = 1) -> int:
        if root:
            print(f"pnode run {name}: {message}", file=sys.stderr, flush=True)
        return status

    # until the training loop takes them over (and after it), SIGTERM and SIGINT end the run
    # through Python, not through PETSc's handler (which calls MPI_Abort)
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    for s in saved:
        signal.signal(s, _raise_interrupt)
    try:
        result = run(name, rest)
    except InterruptedRun as e:
        return fail(f"{e}", e.exit_status)
    except (NotParallelError, UsageError) as e:
        return fail(f"error: {e}", 2)
    except ExampleError as e:
        return fail(f"error: {e}")
    except pnode.SolverError as e:
        return fail(f"the ODE solver failed: {e}\n"
                    "Try a smaller --lr, another --method or tighter tolerances.")
    except PETSc.Error as e:
        # e.g. -pnode_ts_type bogus: PETSc refuses the option when the first solver reads it
        return fail(f"error: PETSc refused the options: {_petsc_reason(e)}; check the single-dash "
                    "PETSc options (names, values; -help lists them)", 2)
    except OSError as e:
        return fail(f"cannot write the outputs: {e.strerror or e} ({e.filename or ''}); "
                    "choose another --out")
    except KeyboardInterrupt:  # outside the training loop (set-up, evaluation): nothing to save
        sig = _SIGNALLED[-1] if _SIGNALLED else signal.SIGINT
        return fail(f"interrupted ({signal.Signals(sig).name}) outside the training loop; the last "
                    "checkpoint (if any) is intact", 128 + int(sig))
    finally:
        for s, h in saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    if not root:
        return 0
    m = result.metrics
    if m["final_loss"] is None:
        print(f"{name}: no training iterations")
    else:
        print(f"{name}: {m['iterations']} iterations in {m['train_seconds']:.1f} s, "
              f"final loss {m['final_loss']:.6g}")
    for k, v in m["metrics"].items():
        print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"outputs in {result.out}: metrics.json, checkpoint.pt, {', '.join(m['figures'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pnode`` console script.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after ``pnode`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 for a failed run, 2 for bad usage.
    """
    import pnode  # noqa: F401  (initialises PETSc, which installs its own signal handlers)

    # `pnode info | head` closes the pipe early: exit quietly, not through PETSc's handler.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = argparse.ArgumentParser(prog="pnode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, PETSc/MPI build, method table")
    p_info.set_defaults(run=_cmd_info)
    sub.add_parser("run", help="train a bundled example (pnode run --list)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":
        # everything after `run` belongs to the example's own parser (and to PETSc)
        return _cmd_run(argv[1:])
    args, _petsc_args = parser.parse_known_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
