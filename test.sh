#!/usr/bin/env bash
# pnode's test command: lint, the serial suite, then the MPI suite under mpiexec -n 2 and -n 3.
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

MPIEXEC=$(command -v mpiexec)
for n in 2 3; do  # 3 ranks: uneven shards, and more ranks than this machine's 2 cores
  echo "== MPI tests (mpiexec -n $n)"
  # pytest-timeout's thread method: its SIGALRM method would interrupt MPI calls
  timeout 600 "$MPIEXEC" -n "$n" "$VENV/bin/python" -m pytest -q -m mpi --timeout=300 \
    --timeout-method=thread -p no:cacheprovider tests/mpi
  # SNOpt's factor reduction and shared inversion (rank-count agnostic)
  timeout 600 "$MPIEXEC" -n "$n" "$VENV/bin/python" -m pytest -q --timeout=300 \
    --timeout-method=thread -p no:cacheprovider tests/control/test_distributed.py
done
