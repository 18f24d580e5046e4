"""Serialisation of :class:`pnode.multilevel.RMTR` (its ``state_dict`` format, version 1).

The format holds only tensors and primitive containers, so it loads with
``torch.load(weights_only=True)``; its keys and structure are fixed by the
checkpoints already written (``pnode run rmtr`` resumes from them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.nn.utils import parameters_to_vector

from .rmtr_levels import _State

if TYPE_CHECKING:
    from .rmtr import RMTR


def save_state(rm: RMTR) -> dict[str, Any]:
    """The state of ``rm``: levels, radii, L-SR1 memories and, within a run, the run itself."""
    levels = []
    for lvl in rm.levels:
        levels.append({
            "params": parameters_to_vector(lvl.params).detach().clone(),
            "radius": lvl.radius, "budget": lvl.budget,
            "v": lvl.v, "x0": lvl.x0, "sr1": lvl.sr1.state_dict()})
    state: dict[str, Any] = {"format": "pnode-rmtr", "version": 1, "n_levels": rm.n_levels,
                             "top": rm._top, "work": rm._work, "accepted": rm._accepted,
                             "levels": levels, "run": None}
    run = rm._run
    if run is not None:
        st = run.st
        state["run"] = {
            "N": run.N, "x": run.x, "elapsed": run.elapsed, "iteration": run.iteration,
            "level_losses": list(run.level_losses), "sched": run.sched.state_dict(),
            "hist": {k: (list(v) if isinstance(v, list) else v) for k, v in vars(run.hist).items()},
            "st": None if st is None else {"x": st.x, "f": st.f, "g": st.g, "correct": st.correct,
                                           "n": st.n}}
    return state


def load_state(rm: RMTR, state: dict[str, Any]) -> None:
    """Restore :func:`save_state` into ``rm`` (see :meth:`RMTR.load_state_dict`).

    Raises
    ------
    ValueError
        A state of another configuration, or a saved run without a started one.
    """
    if not isinstance(state, dict) or state.get("format") != "pnode-rmtr":
        raise ValueError("Invalid state: not an RMTR state_dict")
    if state["n_levels"] != rm.n_levels or len(state["levels"]) != len(rm.levels):
        raise ValueError(f"Invalid state: {state['n_levels']} levels, this RMTR has {rm.n_levels}")
    for lvl, ls in zip(rm.levels, state["levels"], strict=True):
        n = sum(p.numel() for p in lvl.params)
        if ls["params"].numel() != n:
            raise ValueError(f"Invalid state: a level with {ls['params'].numel()} parameters, "
                             f"this one has {n}")
    saved_run = state.get("run")
    if saved_run is not None:
        if rm._run is None:
            raise ValueError("Invalid use: the state holds a run in progress; call start(X, y) "
                             "with the same data first")
        if saved_run["N"] != rm._run.N:
            raise ValueError(f"Invalid state: a run on {saved_run['N']} samples, the started one "
                             f"has {rm._run.N}")
    for lvl, ls in zip(rm.levels, state["levels"], strict=True):
        lvl.load(ls["params"].to(lvl.params[0].dtype))
        lvl.radius, lvl.budget = float(ls["radius"]), float(ls["budget"])
        lvl.v, lvl.x0 = ls["v"], ls["x0"]
        lvl.sr1.load_state_dict(ls["sr1"])
    rm._top, rm._work = int(state["top"]), float(state["work"])
    rm._accepted = int(state["accepted"])
    if saved_run is None:
        return
    run = rm._run
    run.x, run.elapsed = saved_run["x"], float(saved_run["elapsed"])
    run.iteration = int(saved_run["iteration"])
    run.level_losses = list(saved_run["level_losses"])
    run.sched.load_state_dict(saved_run["sched"])
    run.hist = type(run.hist)(**{k: (list(v) if isinstance(v, list) else v)
                          for k, v in saved_run["hist"].items()})
    st = saved_run["st"]
    run.st = None if st is None else _State(st["x"], float(st["f"]), st["g"], float(st["correct"]),
                                            int(st["n"]))
