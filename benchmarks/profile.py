"""Where the gateway's CPU goes under load: py-spy on ``repairy-gateway serve`` behind wrk.

    .venv/bin/pip install -e '.[dev]'        # py-spy
    .venv/bin/python -m benchmarks.profile [--seconds 10] [GATEWAY_X=value ...]

Starts nginx as the upstream (as :mod:`benchmarks.speed` does), the gateway with its defaults
(plus any ``NAME=value`` given), loads it with wrk at 32 connections and samples it with
py-spy. Prints the share of samples spent in the framework (aiohttp, asyncio, uvloop: what the
floor proxy spends too) against the gateway's own code, then the gateway's functions by
their own samples (with the libraries they call directly folded in: json, prometheus-client,
logging). Samples are shares of one process's time, so they do not depend on the machine's
neighbours the way requests/s do.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import PATH, _wait_ready, gateway_env, nginx_upstream, started
from benchmarks.proxy_overhead import _free_port
from tests.tools import require_binary

_FOLDED = ("prometheus_client", "json/", "logging/", "aiohttp_retry", "/re/", "functools",
           "<string>", "contextvars")


def summarise(raw: Path, top: int = 30) -> str:
    """The framework/own split and the top own functions of py-spy's raw (collapsed) output."""
    owners: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        if "(gateway/" in leaf:
            owners[re.sub(r" \(.*", "", leaf)] += n
        elif any(lib in leaf for lib in _FOLDED):
            caller = next((f for f in reversed(frames) if "(gateway/" in f), None)
            owners[re.sub(r" \(.*", "", caller) if caller else "framework"] += n
        else:
            owners["framework"] += n
    lines = [f"samples: {total}",
             f"framework (aiohttp, asyncio, uvloop): {100 * owners['framework'] / total:.1f}%",
             f"gateway's own code: {100 * (total - owners['framework']) / total:.1f}%", ""]
    for name, n in owners.most_common(top + 1):
        if name != "framework":
            lines.append(f"{100 * n / total:5.1f}%  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("settings", nargs="*", help="NAME=value for the gateway")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.settings)
    wrk = require_binary("wrk", "wrk")
    py_spy = Path(sys.executable).parent / "py-spy"
    with tempfile.TemporaryDirectory(prefix="repairy-profile-") as tmp:
        d = Path(tmp)
        port, admin = _free_port(), _free_port()
        raw = d / "profile.txt"
        with nginx_upstream(d) as upstream, started(
                [sys.executable, "-m", "gateway", "serve"],
                gateway_env(upstream, port, admin, **extra), d / "gw.log") as gw:
            _wait_ready(admin)
            load = subprocess.Popen(
                [wrk, "-t1", "-c32", f"-d{args.seconds + 3}s", f"http://127.0.0.1:{port}{PATH}"],
                stdout=subprocess.PIPE, text=True)
            time.sleep(1.5)
            subprocess.run([str(py_spy), "record", "-r", "400", "-d", str(args.seconds),
                            "-p", str(gw.pid), "-f", "raw", "-o", str(raw), "--nonblocking"],
                           check=True, capture_output=True)
            out = load.communicate()[0]
        rps = re.search(r"Requests/sec:\s+(\S+)", out)
        print(f"wrk: {rps.group(1) if rps else '?'} requests/s while sampled")
        print(summarise(raw))
        if os.environ.get("PROFILE_RAW"):
            Path(os.environ["PROFILE_RAW"]).write_text(raw.read_text())


if __name__ == "__main__":
    main()
