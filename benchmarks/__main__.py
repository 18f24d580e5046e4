"""``python -m benchmarks``: the issue-5 benchmark suite (see :mod:`benchmarks.suite`)."""

from benchmarks.suite import main

if __name__ == "__main__":
    main()
