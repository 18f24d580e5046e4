"""`pnode run rober` as a plain script: `python examples/rober.py --quick --out runs/rober`.

The example lives in :mod:`pnode.examples.rober` (data, model, training step,
evaluation, figures); copy that module to adapt it.  Every flag of
`pnode run rober --help` works here, and so do PETSc options (`-pnode_ts_...`).
"""

import sys

from pnode.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "rober", *sys.argv[1:]]))
