"""`pnode run cnf2d` as a plain script: `python examples/cnf2d.py --quick --out runs/cnf2d`.

The example lives in :mod:`pnode.examples.cnf2d` (data, model, training step,
evaluation, figures); copy that module to adapt it.  Every flag of
`pnode run cnf2d --help` works here, and so do PETSc options (`-pnode_ts_...`).
"""

import sys

from pnode.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "cnf2d", *sys.argv[1:]]))
