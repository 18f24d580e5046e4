"""Helpers for the example tests: run the CLI in-process and read its outputs."""

import json
from pathlib import Path

import pytest

from pnode.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a shorter spiral (fewer samples to generate, roll out and plot) for the resume tests
SMALL_SPIRAL = ["--n-samples", "120", "--t-end", "3"]


def run_cli(*args: str) -> int:
    return main(["run", *args, "--no-progress"])


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, to prove that a failed run changed nothing."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "run"
