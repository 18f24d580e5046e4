"""`pnode run spiral` as a plain script: `python examples/spiral.py --quick --out runs/spiral`.

The example lives in :mod:`pnode.examples.spiral` (data, model, training step,
evaluation, figures); copy that module to adapt it.  Every flag of
`pnode run spiral --help` works here, and so do PETSc options (`-pnode_ts_...`).
"""

import sys

from pnode.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "spiral", *sys.argv[1:]]))
