"""`pnode run cnf-tabular` as a plain script: `python examples/cnf_tabular.py --quick --out runs/cnf-tabular`.

The example lives in :mod:`pnode.examples.cnf_tabular` (data, model, training step,
evaluation, figures); copy that module to adapt it.  Every flag of
`pnode run cnf-tabular --help` works here, and so do PETSc options (`-pnode_ts_...`).
"""

import sys

from pnode.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "cnf-tabular", *sys.argv[1:]]))
