"""The house keeps its shape: imports inside ``gateway/`` only point down.

Every import counts, also those inside a function or under ``TYPE_CHECKING``: a circle there
still ties the modules together. The components (``token/``, ``proxy/``, ``coordination/``)
never reach up to the settings, the wiring or the processes; errors never import HTTP
classes; no module grows past about 350 lines unless it is listed here with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"
#: What sits above the components: they must never import it.
ABOVE_COMPONENTS = ("gateway.settings", "gateway.settings_docs", "gateway.wiring",
                    "gateway.state", "gateway.app", "gateway.cli", "gateway.commands",
                    "gateway.worker", "gateway.supervisor", "gateway.admin",
                    "gateway.credentials")
COMPONENTS = ("gateway.token", "gateway.proxy", "gateway.coordination")
#: Lines a module may have; the exceptions say why.
MAX_LINES = 370
LONGER = {
    # The one owner of the token's RenewalState: the request path's reads, the renewal loop
    # and the rotation all change that one value under the one-auth-call-at-a-time rule;
    # fleet coordination (token/fleet_sync.py) and the interfaces (token/source.py) are out.
    "gateway.token.manager": 540,
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                # ``from package import module`` ties to that module, not to the package's
                # face (which Python runs first for any of its modules anyway).
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                if target in modules and target != name and target != "gateway":
                    graph[name].add(target)
                # Python runs the target's packages first: a circle through an __init__ is
                # one too (not the importer's own packages: their faces run it, not it them).
                parts = target.split(".")
                for depth in range(2, len(parts)):
                    parent = ".".join(parts[:depth])
                    if parent in modules and not (name + ".").startswith(parent + "."):
                        graph[name].add(parent)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_no_import_goes_round_in_a_circle() -> None:
    assert _cycles(_graph()) == []


def test_layers_components_never_import_what_builds_them() -> None:
    graph = _graph()
    wrong = sorted((name, target) for name, targets in graph.items()
                   if name.startswith(COMPONENTS) for target in targets
                   if target.startswith(ABOVE_COMPONENTS))
    assert wrong == []


def test_layers_errors_and_values_import_no_http_and_no_component() -> None:
    graph = _graph()
    for bottom in ("gateway.errors", "gateway.declare", "gateway.config_values",
                   "gateway.clock", "gateway.redact"):
        assert not {t for t in graph[bottom] if t.startswith(COMPONENTS)}, bottom
    tree = ast.parse((PACKAGE / "errors.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module or "" for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.startswith(("aiohttp", "gateway.proxy"))}


def test_layers_modules_stay_small() -> None:
    sizes = {_module(p): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py")}
    over = {name: n for name, n in sizes.items() if n > LONGER.get(name, MAX_LINES)}
    assert over == {}
    assert all(sizes[name] > MAX_LINES for name in LONGER)  # no stale exception
