#!/usr/bin/env bash
# pnode's test command: lint, the serial suite, then the MPI suite under mpiexec -n 2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENV=${PNODE_VENV:-$ROOT/.venv}
[ -x "$VENV/bin/python" ] || { echo "no $VENV: run ./install.sh first" >&2; exit 1; }
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=1

echo "== ruff"
"$VENV/bin/ruff" check pnode tests $(for d in benchmarks examples; do [ -d "$d" ] && echo "$d"; done)

echo "== docs (sphinx, warnings are errors)"
DOCS_OUT=$(mktemp -d)
"$VENV/bin/python" -m sphinx -W --keep-going -q -b html docs "$DOCS_OUT"
rm -rf "$DOCS_OUT"

echo "== serial tests"
"$VENV/bin/python" -m pytest -q -m "not mpi" --timeout=900 tests "$@"

echo "== MPI tests (mpiexec -n 2)"
MPIEXEC=$(command -v mpiexec)
timeout 600 "$MPIEXEC" -n 2 "$VENV/bin/python" -m pytest -q -m mpi --timeout=300 \
  -p no:cacheprovider tests/mpi
