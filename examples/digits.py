"""`pnode run digits` as a plain script: `python examples/digits.py --quick --out runs/digits`.

The example lives in :mod:`pnode.examples.digits` (data, model, training step,
evaluation, figures); copy that module to adapt it.  Every flag of
`pnode run digits --help` works here, and so do PETSc options (`-pnode_ts_...`).
"""

import sys

from pnode.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "digits", *sys.argv[1:]]))
