"""Rendering the Helm chart with a real helm binary, for the chart tests."""

from __future__ import annotations

import json
import re
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


def render_app_chart(binary: str, workdir: Path, *args: str) -> str:
    """Render the example app chart (sidecar mode) from a copy, dependencies built offline;
    ``args`` go to ``helm template``."""
    copy = workdir / "app-chart"
    shutil.copytree(EXAMPLES / "app-chart", copy,
                    ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    (workdir / "repairy-gateway").symlink_to(CHART)  # file://../../repairy-gateway, relocated
    lock = copy / "Chart.yaml"
    lock.write_text(lock.read_text().replace("file://../../repairy-gateway",
                                             "file://../repairy-gateway"))
    result = helm(binary, "dependency", "build", str(copy))
    assert result.returncode == 0, result.stderr
    result = helm(binary, "template", "demo", str(copy), "--namespace", "apps", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def values_table(values_file: Path = CHART / "values.yaml") -> str:
    """The chart README's values table, from values.yaml: each leaf value with its default
    and the ``# --`` comment above it (or above its nearest commented parent)."""
    docs: dict[str, str] = {}
    path: list[tuple[int, str]] = []
    pending: list[str] = []
    for raw in values_file.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# --"):
            pending = [line[4:].strip()]
        elif line.startswith("#") and pending:
            pending.append(line[1:].strip())
        elif re.match(r"^[A-Za-z0-9_]+:", line):
            indent = len(raw) - len(raw.lstrip())
            while path and path[-1][0] >= indent:
                path.pop()
            key = line.split(":", 1)[0]
            path.append((indent, key))
            if pending:
                docs[".".join(k for _, k in path)] = " ".join(pending)
            pending = []
        elif not line:
            pending = []
    values = yaml.safe_load(values_file.read_text())
    rows = ["| Key | Default | Description |", "|---|---|---|"]

    def walk(node: Any, prefix: str, doc: str) -> None:
        doc = docs.get(prefix, doc)
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key), doc)
            return
        rows.append(f"| `{prefix}` | `{json.dumps(node)}` | {doc} |")

    walk(values, "", "")
    return "\n".join(rows) + "\n"
