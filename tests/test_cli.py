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
