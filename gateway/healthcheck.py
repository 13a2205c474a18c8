"""Container health check using only the standard library (no aiohttp import, no curl).

``python -m gateway.healthcheck`` asks the admin listener's ``/healthz`` (address from
``GATEWAY_ADMIN_LISTEN``, a wildcard bind is asked on loopback) and exits 0 or 1.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def admin_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/healthz"


def main() -> int:
    url = admin_url(os.environ.get("GATEWAY_ADMIN_LISTEN", "127.0.0.1:9091"))
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
