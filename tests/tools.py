"""Real external tools for tests, installed on demand from Debian's packages (never skipped).

CI runs as root on a fresh machine: the first test that needs ``promtool`` or ``prometheus``
installs the Debian package that ships it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess


@functools.cache
def _apt_updated() -> None:
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600)


def require_binary(name: str, apt_package: str) -> str:
    """Path of ``name``; installs ``apt_package`` first if it is missing."""
    found = shutil.which(name)
    if found:
        return found
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
