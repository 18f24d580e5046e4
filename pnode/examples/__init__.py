"""Bundled examples behind ``pnode run <example>``; each is also a module you can read and copy.

=============== =====================================================================
``spiral``      fit a 2-D spiral ODE from trajectory samples
``cnf2d``       continuous normalizing flow on 2-D densities (exact trace)
``cnf-tabular`` continuous normalizing flow on a standardized scikit-learn dataset (Hutchinson)
``digits``      classification with an ODE block on scikit-learn's 8x8 digits
``rober``       Robertson's stiff kinetics: rate constants from noisy data, implicit method
``pde``         closure term of a method-of-lines viscous Burgers equation, IMEX method
``snopt``       the digits classifier trained by SNOpt (second-order, factors from the adjoint)
``rmtr``        multilevel trust-region training of a forward-Euler ResNet on the digits
=============== =====================================================================

Use them from Python with :func:`run`::

    from pnode.examples import run
    result = run("cnf2d", ["--quick", "--out", "runs/cnf2d"])
    print(result.metrics["metrics"]["test_loglik"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .cnf2d import CNF2D
from .cnf_tabular import CNFTabular
from .dae import PendulumDAE
from .digits import Digits
from .pde import BurgersClosure
from .rmtr import DigitsRMTR
from .rober import RoberKinetics
from .runner import (
    CheckpointError,
    Example,
    ExampleError,
    InterruptedRun,
    NotParallelError,
    Option,
    RunResult,
    UsageError,
    run_example,
)
from .snopt import DigitsSNOpt
from .spiral import Spiral

__all__ = ["EXAMPLES", "run", "Example", "Option", "RunResult", "ExampleError", "CheckpointError",
           "Spiral", "CNF2D", "CNFTabular", "Digits", "RoberKinetics", "BurgersClosure", "DigitsSNOpt"]
__all__ += ["NotParallelError", "DigitsRMTR", "UsageError", "InterruptedRun"]

#: example name -> class, in the order ``pnode run --list`` shows them
EXAMPLES: dict[str, type[Example]] = {
    cls.name: cls
    for cls in (Spiral, CNF2D, CNFTabular, Digits, RoberKinetics, BurgersClosure, DigitsSNOpt)
}
EXAMPLES[PendulumDAE.name] = PendulumDAE  # pnode run dae (pnode/examples/dae.py)
EXAMPLES[DigitsRMTR.name] = DigitsRMTR


def run(name: str, argv: Sequence[str] = (), *, out_default: Path | None = None) -> RunResult:
    """Run example ``name`` with command-line style arguments.

    Parameters
    ----------
    name : str
        One of :data:`EXAMPLES`.
    argv : sequence of str
        Flags such as ``["--quick", "--out", "runs/x"]`` and PETSc options.
    out_default : Path, optional
        Output folder when ``--out`` is not given.

    Returns
    -------
    RunResult
        Output folder, the content of ``metrics.json`` and the per-iteration losses.

    Raises
    ------
    ValueError
        Unknown example (the message lists the valid ones).
    ExampleError
        Bad options, output folder or checkpoint.
    """
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; valid: {', '.join(EXAMPLES)}")
    return run_example(EXAMPLES[name], argv, out_default=out_default)
