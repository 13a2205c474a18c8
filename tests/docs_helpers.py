"""Code blocks of the docs, for tests that run or check them: a block is the fenced code
right after a ``<!-- example: NAME -->`` line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def code_block(doc: str, name: str) -> str:
    """The code of example ``name`` in ``doc`` (a path from the repository root)."""
    text = (ROOT / doc).read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in {doc}"
    return match.group(1)


def python_block(doc: str, name: str) -> dict[str, Any]:
    """The namespace of a Python example, executed."""
    namespace: dict[str, Any] = {}
    exec(compile(code_block(doc, name), f"{doc}:{name}", "exec"), namespace)
    return namespace
