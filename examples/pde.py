"""`pnode run pde` as a plain script: `python examples/pde.py --quick --out runs/pde`.

The example lives in :mod:`pnode.examples.pde` (data, model, training step,
evaluation, figures); copy that module to adapt it.  Every flag of
`pnode run pde --help` works here, and so do PETSc options (`-pnode_ts_...`).
"""

import sys

from pnode.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "pde", *sys.argv[1:]]))
