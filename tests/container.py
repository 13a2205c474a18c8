"""Building and running the image with podman, on this kind of machine.

No container registry is reachable here, so the ``python:*-slim`` base cannot be pulled: a
stand-in base is made with debootstrap from Debian's packages (bookworm with its Python 3.11,
imported as ``localhost/python-standin``) and passed as the ``PYTHON_IMAGE`` build argument.
The sandbox this runs in has hybrid cgroups and refuses raising rlimits, so builds use chroot
isolation and containers run under runc with the cgroupfs manager and explicit ulimits.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.tools import require_binary

STANDIN = "localhost/python-standin:3.11-bookworm"


def podman() -> list[str]:
    require_binary("runc", "runc")
    return [require_binary("podman", "podman"), "--runtime", "runc",
            "--cgroup-manager=cgroupfs"]


def run_flags() -> list[str]:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return ["--rm", "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def ensure_standin_base() -> str:
    exists = subprocess.run([*podman(), "image", "exists", STANDIN], check=False)
    if exists.returncode == 0:
        return STANDIN
    debootstrap = require_binary("debootstrap", "debootstrap")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run([debootstrap, "--variant=minbase",
                        "--include=python3,python3-venv,ca-certificates", "bookworm",
                        str(root), "http://deb.debian.org/debian"],
                       check=True, capture_output=True, timeout=900)
        (root / "usr" / "bin" / "python").symlink_to("python3")
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        subprocess.run([*podman(), "import", str(archive), STANDIN], check=True,
                       capture_output=True, timeout=600)
    return STANDIN


def build(context: Path, tag: str) -> subprocess.CompletedProcess[str]:
    args = [*podman(), "build", "--isolation=chroot", "--network", "host",
            "--build-arg", f"PYTHON_IMAGE={ensure_standin_base()}", "-t", tag]
    # This machine may reach PyPI through a CA of its own: lend the build its CA bundle.
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).exists():
        args += ["-v", f"{cert}:/etc/ssl/certs/build-host-ca.crt:ro",
                 "--env", "PIP_CERT=/etc/ssl/certs/build-host-ca.crt"]
    return subprocess.run([*args, str(context)], capture_output=True, text=True,
                          timeout=1200, check=False)
