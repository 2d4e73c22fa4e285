"""The tree is ruff- and mypy-clean (the configuration is in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["grammar", "ir", "codegen", "bpfilter"]


def _tool(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")


def test_ruff_clean() -> None:
    _tool("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                           *SOURCES, "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean() -> None:
    _tool("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy", *SOURCES], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
