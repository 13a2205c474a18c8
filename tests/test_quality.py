"""The project's own static checks, so the one test command runs them all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

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


@pytest.mark.unit
def test_quality_no_install_makes_a_missing_tool_skip_with_its_package(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """REPAIRY_GATEWAY_TESTS_NO_INSTALL=1: a missing tool skips (naming the package), it is
    never installed; unset (as in CI), installing is the default."""
    from tests.tools import NO_INSTALL, require_binary

    monkeypatch.setenv(NO_INSTALL, "1")
    with pytest.raises(pytest.skip.Exception, match="apt-get install no-such-package"):
        require_binary("no-such-tool-here", "no-such-package")
    assert require_binary("sh", "dash")  # present tools are used as they are
