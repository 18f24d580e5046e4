"""Packaging for pnode (build configuration lives in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    name="pnode",
    version="0.1.0",
    description=(
        "Neural ODEs with exact PETSc discrete-adjoint gradients, stiff/IMEX solvers, "
        "checkpointing, SNOpt, RMTR and MPI"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pnode", "pnode.*"]),
    # torch, petsc4py and mpi4py are installed by install.sh (CPU torch, PETSc built with MPI);
    # listing them here would let pip pull a CUDA torch or an MPI-less PETSc.
    install_requires=[
        "numpy",
        "scipy",
        "torchdiffeq",
        "checkpoint-schedules",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "ruff", "sphinx>=7", "numpydoc>=1.6"],
    },
    entry_points={"console_scripts": ["pnode=pnode.cli:main"]},
)
