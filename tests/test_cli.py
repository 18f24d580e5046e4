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
