"""The project's own static checks, so the one test command runs them all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_quality_ruff_passes() -> None:
    """ruff finds nothing in the package, tests and benchmarks."""
    result = _run("ruff", "check", "gateway", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_quality_mypy_strict_passes() -> None:
    """mypy --strict (configured in pyproject.toml) finds nothing."""
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
