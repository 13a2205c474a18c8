"""Instructions per request under callgrind: the floor, the gateway, and another build of it.

    .venv/bin/python -m benchmarks.instructions [--requests 2000] [--baseline ../other-checkout]

Each contender runs under ``valgrind --tool=callgrind`` with instrumentation off until it is
ready and warmed up (50 requests); then it is switched on, ``hey -n N -c 4`` sends N requests
through it to nginx (:mod:`benchmarks.harness`), and it is switched off again. What is printed
is the user-space instructions the contender's process executed per request while on.

Unlike CPU seconds, the count does not depend on what else the machine is doing: the same
build gives the same figure within a fraction of a percent, run after run, so a change of 1 %
is visible where the seconds of :mod:`benchmarks.speed` spread by 20 % from run to run on this
shared machine. It leaves out the kernel's time (the system calls, which the floor and the
gateway make alike) and the cost of cache misses, so it judges changes to the Python that
runs per request; :mod:`benchmarks.speed` remains the measure of seconds. valgrind is installed
with apt-get when missing (as root).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import (
    PATH,
    ROOT,
    _wait_port,
    _wait_ready,
    gateway_env,
    nginx_upstream,
    started,
)
from benchmarks.proxy_overhead import _free_port
from tests.tools import require_binary


def count(name: str, requests: int, upstream: str, d: Path, checkout: Path = ROOT,
          settings: dict[str, str] | None = None) -> int:
    """Instructions the contender ``name`` (floor or a gateway from ``checkout``, with
    ``settings`` added to its environment) executed for ``requests`` requests."""
    valgrind = require_binary("valgrind", "valgrind")
    control = require_binary("callgrind_control", "valgrind")
    hey = require_binary("hey", "hey")
    port, admin = _free_port(), _free_port()
    out = d / f"cg-{name}"
    out.mkdir()
    vg = [valgrind, "--tool=callgrind", "--instr-atstart=no",
          f"--callgrind-out-file={out}/callgrind.out.%p"]
    if name == "floor":
        args = [*vg, sys.executable, "-m", "benchmarks.floor_proxy", "--listen",
                f"127.0.0.1:{port}", "--upstream", upstream]
        env = None
    else:
        args = [*vg, sys.executable, "-m", "gateway", "serve"]
        env = gateway_env(upstream, port, admin, **(settings or {}))
    url = f"http://127.0.0.1:{port}{PATH}"
    with started(args, env, d / f"{name}.log", cwd=checkout) as proc:
        _wait_port(port, 300)
        if name != "floor":
            _wait_ready(admin, 300)
        subprocess.run([hey, "-n", "50", "-c", "4", url], capture_output=True, check=True)
        subprocess.run([control, "-i", "on", str(proc.pid)], capture_output=True, check=True)
        load = subprocess.run([hey, "-n", str(requests), "-c", "4", url], capture_output=True,
                              text=True, check=True).stdout
        subprocess.run([control, "-i", "off", str(proc.pid)], capture_output=True, check=True)
        answered = re.search(r"\[200\]\s+(\d+) responses", load)
        if answered is None or int(answered.group(1)) != requests:
            raise RuntimeError(f"{name}: not every request got a 200:\n{load[-1500:]}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    total = 0
    for path in glob.glob(f"{out}/callgrind.out.*"):
        for line in Path(path).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    if not total:
        raise RuntimeError(f"{name}: callgrind wrote no totals")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of another build, counted as 'baseline'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repairy-instructions-") as tmp, nginx_upstream(
            Path(tmp)) as upstream:
        d = Path(tmp)
        t0 = time.monotonic()
        figures = {"floor": count("floor", args.requests, upstream, d),
                   "gateway": count("gateway", args.requests, upstream, d)}
        if args.baseline is not None:
            figures["baseline"] = count("baseline", args.requests, upstream, d,
                                        args.baseline.resolve())
    floor = figures["floor"]
    print(f"instructions per request, {args.requests} requests each (hey -c 4), "
          f"{time.monotonic() - t0:.0f} s under callgrind; Python {sys.version.split()[0]}, "
          f"{os.uname().machine}")
    for name, total in figures.items():
        print(f"{name:9} {total / args.requests:>11,.0f}  {total / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
