"""Rendering the Helm chart with a real helm binary, for the chart tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "repairy-gateway"
EXAMPLES = ROOT / "helm" / "examples"
#: Stand-in values so the defaults render (what a user must always provide).
REQUIRED_VALUES: dict[str, Any] = {
    "repairy": {"baseUrl": "https://partners.repairy.example"},
    "credentials": {"existingSecret": "repairy-credentials"},
    "inbound": {"allowedCidrs": ["10.0.0.0/8"]},
}


def helm(binary: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


def render(binary: str, *args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    result = helm(binary, "template", "demo", str(chart), "--namespace", "apps", *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_app_chart(binary: str, workdir: Path) -> str:
    """Render the example app chart (sidecar mode) from a copy, dependencies built offline."""
    copy = workdir / "app-chart"
    shutil.copytree(EXAMPLES / "app-chart", copy,
                    ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    (workdir / "repairy-gateway").symlink_to(CHART)  # file://../../repairy-gateway, relocated
    lock = copy / "Chart.yaml"
    lock.write_text(lock.read_text().replace("file://../../repairy-gateway",
                                             "file://../repairy-gateway"))
    result = helm(binary, "dependency", "build", str(copy))
    assert result.returncode == 0, result.stderr
    result = helm(binary, "template", "demo", str(copy), "--namespace", "apps")
    assert result.returncode == 0, result.stderr
    return result.stdout


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc
