"""Bad input: unknown example or option, damaged or foreign checkpoints, non-empty output folders."""

import pytest
import torch

from pnode.cli import main
from pnode.examples import EXAMPLES, CheckpointError, ExampleError, run
from pnode.examples.runner import split_petsc_options

from .conftest import run_cli, snapshot


def test_unknown_example_lists_valid_ones(capsys):
    assert main(["run", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown example 'nosuch'" in err
    for name in EXAMPLES:
        assert name in err
    with pytest.raises(ValueError, match="valid: spiral, cnf2d"):
        run("nosuch")


def test_run_without_example_and_list(capsys):
    assert main(["run"]) == 2
    assert "cnf-tabular" in capsys.readouterr().err
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXAMPLES)


def test_unknown_option_lists_valid_ones(capsys, out):
    with pytest.raises(SystemExit) as e:
        run_cli("spiral", "--bogus", "3", "--out", str(out))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s) --bogus 3" in err and "--iters" in err and "--hidden" in err
    assert not out.exists()


def test_bad_choice_and_value(capsys, out):
    with pytest.raises(SystemExit):
        run_cli("cnf2d", "--dataset", "spirals", "--out", str(out))
    assert "moons" in capsys.readouterr().err
    # a count that cannot describe a run is a usage error: status 2, as argparse's own
    assert run_cli("spiral", "--iters", "0", "--out", str(out)) == 2
    assert "Invalid --iters 0: must be positive" in capsys.readouterr().err
    assert run_cli("spiral", "--threads", "0", "--out", str(out)) == 2
    assert run_cli("spiral", "--checkpoint-every", "-1", "--out", str(out)) == 2
    assert "Invalid --checkpoint-every -1: must be 0 (off) or positive" in capsys.readouterr().err
    assert not out.exists()


def test_example_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "rober", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--method" in text and "--resume" in text and "PETSc options" in text


def test_non_empty_out_is_not_clobbered(out, capsys):
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("digits", "--iters", "2", "--out", str(out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == {"notes.txt": b"mine"}
    assert run_cli("digits", "--iters", "2", "--out", str(out), "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.json").exists()


def test_resume_without_checkpoint(out, capsys):
    assert run_cli("digits", "--resume", "--out", str(out)) == 1
    assert "no checkpoint.pt" in capsys.readouterr().err


def _finished_run(out):
    assert run_cli("digits", "--iters", "2", "--out", str(out)) == 0
    return out / "checkpoint.pt"


class _NotATensor:
    pass


@pytest.mark.parametrize("payload,message", [
    (b"\x00garbage, not a zip archive" * 10, "cannot read checkpoint"),
    ("truncate", "cannot read checkpoint"),
    ({"model": torch.zeros(2)}, "not a pnode example checkpoint"),
    ("unsafe", "cannot read checkpoint"),  # a pickled class: refused by weights_only=True
])
def test_damaged_or_foreign_checkpoint_changes_nothing(payload, message, out, capsys):
    ckpt = _finished_run(out)
    if payload == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif payload == "unsafe":
        torch.save({"format": "pnode-example-checkpoint", "x": _NotATensor()}, ckpt)
    elif isinstance(payload, bytes):
        ckpt.write_bytes(payload)
    else:
        torch.save(payload, ckpt)
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli("digits", "--resume", "--iters", "4", "--out", str(out)) == 1
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


def test_checkpoint_of_another_example(out, tmp_path):
    ckpt = _finished_run(out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(ckpt.read_bytes())
    with pytest.raises(CheckpointError, match="checkpoint of example 'digits', not 'spiral'"):
        run("spiral", ["--resume", "--out", str(other), "--no-progress"])


def test_resume_with_changed_model_option(out):
    _finished_run(out)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="--width 32 -> 16"):
        run("digits", ["--resume", "--width", "16", "--out", str(out), "--no-progress"])
    assert snapshot(out) == before
    with pytest.raises(ExampleError):
        run("digits", ["--resume", "--lr", "1.0", "--out", str(out), "--no-progress"])


def test_split_petsc_options():
    rest, petsc = split_petsc_options(
        ["--lr", "-0.5", "-pnode_ts_adapt_type", "dsp", "-log_view", "--quick", "-pnode_ts_rtol", "-1e-3",
         "-h"])
    assert rest == ["--lr", "-0.5", "--quick", "-h"]
    assert petsc == {"pnode_ts_adapt_type": "dsp", "log_view": "", "pnode_ts_rtol": "-1e-3"}


def test_petsc_options_reach_the_solver_and_are_removed(tmp_path):
    from petsc4py import PETSc

    a = run("digits", ["--iters", "1", "--out", str(tmp_path / "a"), "--no-progress"])
    b = run("digits", ["--iters", "1", "--out", str(tmp_path / "b"), "--no-progress",
                       "-pnode_ts_rk_type", "1fe"])
    sa, sb = a.metrics["last_solve"], b.metrics["last_solve"]
    assert sa["steps"] == sb["steps"] == 4
    assert sa["rhs_evals"] == 4 * sa["steps"]  # rk4
    assert sb["rhs_evals"] == sb["steps"]  # forward Euler, from the command line
    assert b.metrics["petsc_options"] == {"pnode_ts_rk_type": "1fe"}
    assert not PETSc.Options().hasName("pnode_ts_rk_type")


def test_wrong_method_kind(capsys, out):
    assert run_cli("rober", "--method", "rk4", "--out", str(out)) == 1
    assert "explicit" in capsys.readouterr().err
    assert run_cli("pde", "--method", "trapezoid", "--out", str(out), "--overwrite") == 1
    assert "not an IMEX method" in capsys.readouterr().err
