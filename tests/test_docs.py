"""The documentation: every page linked and every relative link resolving, and the calling
examples really working (Python against the sandbox through the gateway, Node and Go checked
by their own tools)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox
from tests.docs_helpers import ROOT, code_block, python_block
from tests.gateway_helpers import settings_for, wait_until
from tests.tools import require_binary

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

WORKSHOP = "5f1a2b3c4d5e6f7a8b9c0d01"
KEYS = "orders=client-key-orders-0001"
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.unit
def test_docs_every_page_is_linked_from_the_readme_and_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert DOCS and all(f"](docs/{page.name})" in readme for page in DOCS)
    assert len(readme) < 15_000, "the README is the front door: reference goes to docs/"
    for page in [ROOT / "README.md", *DOCS, ROOT / "helm" / "repairy-gateway" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


@pytest.mark.unit
def test_docs_error_table_names_every_gateway_error_code() -> None:
    """docs/calling.md's troubleshooting table has a row for every code the gateway makes."""
    codes = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        if "sandbox" in path.parts:
            continue
        codes |= set(re.findall(r'(?:code="|default_code = ")([a-z_]+)"', path.read_text()))
    assert len(codes) > 30
    table = (ROOT / "docs" / "calling.md").read_text().split("## What each error code means")[1]
    missing = sorted(c for c in codes if f"`{c}`" not in table and c != "internal_error")
    assert missing == []


@pytest.fixture
async def keyed_gateway(sandbox: Sandbox) -> AsyncIterator[GatewayServer]:
    async with GatewayServer(settings_for(sandbox, client_keys=KEYS)) as gw:
        await wait_until(gw.state.tokens.ready)
        yield gw


async def test_docs_python_aiohttp_example_calls_through_the_gateway(
        keyed_gateway: GatewayServer) -> None:
    services = python_block("docs/calling.md", "python-aiohttp")["workshop_services"]
    items = await services(keyed_gateway.url, "client-key-orders-0001", WORKSHOP)
    assert items and all("_id" in item for item in items)
    with pytest.raises(RuntimeError, match="gateway 401 client_unauthenticated"):
        await services(keyed_gateway.url, "client-key-wrong-000001", WORKSHOP)


async def test_docs_python_httpx_example_calls_through_the_gateway(
        keyed_gateway: GatewayServer) -> None:
    services = python_block("docs/calling.md", "python-httpx")["workshop_services"]
    items = await asyncio.to_thread(services, keyed_gateway.url, "client-key-orders-0001",
                                    WORKSHOP)
    assert items and all("_id" in item for item in items)
    with pytest.raises(RuntimeError, match="gateway 401 client_unauthenticated"):
        await asyncio.to_thread(services, keyed_gateway.url, "client-key-wrong-000001",
                                WORKSHOP)


async def test_docs_python_booking_examples_live_a_booking_through_the_gateway(
        keyed_gateway: GatewayServer, sandbox: Sandbox) -> None:
    """Both Python booking examples, against the sandbox through the gateway: created with
    an Idempotency-Key, read, edited, and moved to completed; its start is tomorrow (computed
    from today), and each create went out once."""
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    life = python_block("docs/calling.md", "python-aiohttp-booking")["booking_life"]
    booking = await life(keyed_gateway.url, "client-key-orders-0001", WORKSHOP)
    assert booking["status"] == "completed"
    assert booking["startTime"].startswith(f"{tomorrow}T10:00")  # moved by an hour
    assert booking["notes"] == "Customer asked for 10:00"
    life = python_block("docs/calling.md", "python-httpx-booking")["booking_life"]
    other = await asyncio.to_thread(life, keyed_gateway.url, "client-key-orders-0001",
                                    WORKSHOP)
    assert other["status"] == "completed" and other["startTime"].startswith(tomorrow)
    assert other["id"] != booking["id"]
    assert len(sandbox.state.data.bookings) == 2
    example = python_block("docs/calling.md", "python-aiohttp-booking")
    with pytest.raises(example["GatewayError"], match="401 client_unauthenticated"):
        await example["booking_life"](keyed_gateway.url, "client-key-wrong-000001", WORKSHOP)


@pytest.mark.parametrize("name", ["node-fetch", "node-booking"])
def test_docs_node_examples_pass_node_check(tmp_path: Path, name: str) -> None:
    node = require_binary("node", "nodejs")
    source = tmp_path / "client.mjs"
    source.write_text(code_block("docs/calling.md", name))
    result = subprocess.run([node, "--check", str(source)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["go-net-http", "go-booking"])
def test_docs_go_example_passes_go_vet(tmp_path: Path, name: str) -> None:
    go = require_binary("go", "golang-go")
    (tmp_path / "go.mod").write_text("module example.com/repairyclient\n\ngo 1.19\n")
    (tmp_path / "client.go").write_text(code_block("docs/calling.md", name))
    env = {**os.environ, "GOPATH": str(tmp_path / "gopath"), "GOCACHE": str(tmp_path / "cache"),
           "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "GOPROXY": "off"}
    result = subprocess.run([go, "vet", "./..."], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
