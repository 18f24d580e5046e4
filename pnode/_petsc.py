"""PETSc initialisation and PETSc's options database.

- :func:`init_petsc`: command-line options reach PETSc's options database.
- :func:`inserted_options`: the one options manager; options are inserted around a
  set-up or solve and removed (or restored) after it.  Used by the engine (a
  solver's defaults and forced values) and by ``pnode run`` (command-line options
  for the run).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

__all__ = ["init_petsc", "petsc_argv", "option_value", "is_number", "inserted_options"]

# Command-line arguments PETSc should see: pnode's solver prefix and PETSc's own families.
_PETSC_PREFIXES = ("-pnode_", "-log_", "-info", "-help", "-options_", "-malloc", "-on_error",
                   "-ts_", "-snes_", "-ksp_", "-pc_", "-mat_", "-vec_", "-viewer_")


def petsc_argv(argv: list[str]) -> list[str]:
    """The PETSc options (with their values) among a script's arguments."""
    out: list[str] = []
    args = argv[1:]
    for i, a in enumerate(args):
        if a.startswith(_PETSC_PREFIXES) or a == "-log_view":
            out.append(a)
            value = option_value(args, i)
            if value is not None:
                out.append(value)
    return out


def option_value(args: Sequence[str], i: int) -> str | None:
    """The value of the option ``args[i]``: the next token, unless that is another option.

    PETSc's convention: ``-name value`` or a bare ``-name``; a negative number is a value.
    """
    nxt = args[i + 1] if i + 1 < len(args) else None
    if nxt is None or (nxt.startswith("-") and not is_number(nxt)):
        return None
    return nxt


def is_number(s: str) -> bool:
    """Whether ``s`` parses as a float (so ``-1e-3`` is a value, not an option)."""
    try:
        float(s)
    except ValueError:
        return False
    return True


def init_petsc() -> None:
    """Initialise petsc4py with the PETSc options on the process's command line.

    Options such as ``-pnode_ts_type cn`` or ``-log_view`` given to the user's
    script reach PETSc; the script's own arguments are not passed (PETSc would
    warn about them as unused).  If the application imported ``petsc4py.PETSc``
    first, its initialisation stands.

    PETSc's signal handler is not installed (``-no_signal_handler``): signals
    behave as in any Python program (SIGINT raises ``KeyboardInterrupt`` at the
    next step of a solve, SIGTERM terminates or runs the application's handler)
    instead of going through PETSc's handler to ``MPI_Abort``.
    """
    import petsc4py

    if "petsc4py.PETSc" not in sys.modules:
        petsc4py.init(["pnode", "-no_signal_handler", *petsc_argv(sys.argv)])


@contextmanager
def inserted_options(values: Mapping[str, str], *, override: bool = False) -> Iterator[None]:
    """Insert options into PETSc's database around a block; remove or restore them after.

    Parameters
    ----------
    values : mapping of str to str
        Full option names (with any prefix, without the leading ``-``) and values.
    override : bool, default False
        ``False``: an option already in the database (e.g. from the command line)
        wins, and only the missing ones are inserted (and removed after).  ``True``:
        every value applies inside the block, and the previous values (or their
        absence) are restored after.

    Examples
    --------
    >>> with inserted_options({"pnode_ts_adapt_type": "none"}):  # doctest: +SKIP
    ...     ts.setFromOptions()
    """
    from petsc4py import PETSc

    db = PETSc.Options()
    restore: dict[str, str | None] = {}
    for name, value in values.items():
        present = db.hasName(name)
        if present and not override:
            continue
        restore[name] = db.getString(name) if present else None
        db.setValue(name, value)
    try:
        yield
    finally:
        for name, old in restore.items():
            if old is None:
                db.delValue(name)
            else:
                db.setValue(name, old)
