"""`pnode info`: versions, real MPI in PETSc, the method table."""

import subprocess
import sys

from pnode.cli import environment, main


def test_environment_reports_real_mpi():
    env = environment()
    assert env["PETSc MPI"] == "MPI"
    assert env["PETSc"].startswith("3.26")
    assert env["precision"] == "float64"
    assert int(env["COMM_WORLD size"]) >= 1


def test_info_prints_table(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("petsc4py", "MPI library", "dopri5", "arkimex/4", "implicit_euler"):
        assert word in out


def test_console_script():
    exe = [sys.executable, "-m", "pnode.cli", "info"]
    out = subprocess.run(exe, capture_output=True, text=True, check=True).stdout
    assert "kencarp5" in out


def test_run_is_a_subcommand(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("spiral", "cnf2d", "cnf-tabular", "digits", "rober", "pde"):
        assert f"  {name} " in out
    exe = [sys.executable, "-m", "pnode.cli", "run", "nosuch"]
    res = subprocess.run(exe, capture_output=True, text=True)
    assert res.returncode == 2 and "valid: spiral, cnf2d, cnf-tabular, digits, rober, pde" in res.stderr


def test_info_table_is_the_registry(capsys):
    """`pnode info` lists what pnode.methods() holds, a method registered at run time included."""
    from fractions import Fraction as F

    import pnode
    from pnode.adjoint.methods import register_method, rk_method, unregister_method
    from pnode.adjoint.tableau import ButcherTableau

    ralston = ButcherTableau(A=[[], [F(2, 3)]], b=[F(1, 4), F(3, 4)], order=2)
    register_method(rk_method("ralston_cli", ralston))
    try:
        assert main(["info"]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
        for m in pnode.methods():
            assert rows[m.name][1:3] == [m.petsc, str(m.order)], m.name
        assert rows["ralston_cli"][1] == "rk/pnode_ralston_cli"
    finally:
        unregister_method("ralston_cli")
    assert main(["info"]) == 0
    assert "ralston_cli" not in capsys.readouterr().out


def _run_cli(*args):
    return main(["run", *args, "--no-progress"])


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_bad_petsc_option_is_one_line_with_status_2(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run_cli("digits", "--iters", "2", "--out", str(out), "-pnode_ts_type", "bogus") == 2
    _one_line_error(capsys, "Unknown TS type: bogus", "PETSc error code 86", "PETSc options")
    assert not out.exists()  # nothing written
    from petsc4py import PETSc

    assert not PETSc.Options().hasName("pnode_ts_type")  # and the option is gone again
    assert _run_cli("digits", "--iters", "1", "--out", str(out)) == 0


def test_bad_value_and_unwritable_out_are_one_line_with_status_2(tmp_path, capsys):
    assert _run_cli("digits", "--lr", "nan", "--out", str(tmp_path / "a")) == 2
    _one_line_error(capsys, "Invalid --lr nan")
    assert _run_cli("digits", "--lr", "-1", "--out", str(tmp_path / "a")) == 2
    _one_line_error(capsys, "Invalid --lr -1")
    # /sys refuses new files even to root (for whom permission bits do not apply)
    assert _run_cli("digits", "--iters", "1", "--out", "/sys/pnode-test-out") == 2
    _one_line_error(capsys, "cannot write to /sys", "choose another --out")
    (tmp_path / "file").write_text("x")
    assert _run_cli("digits", "--iters", "1", "--out", str(tmp_path / "file" / "run")) == 2
    _one_line_error(capsys, "is a file, not a folder")
    assert not (tmp_path / "a").exists()


def test_empty_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert _run_cli("digits", "--resume", "--out", str(out)) == 1
    _one_line_error(capsys, "checkpoint", "is empty", "left as it is")
    assert (out / "checkpoint.pt").read_bytes() == b""


def test_bad_petsc_option_in_a_subprocess_has_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "pnode.cli", "run", "rober", "--iters", "1", "--no-progress",
           "--out", str(tmp_path / "r"), "-pnode_ts_type", "bogus"]
    res = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Traceback" not in res.stderr
    assert "Unknown TS type: bogus" in res.stderr
