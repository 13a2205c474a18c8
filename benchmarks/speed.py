"""The speed benchmark: the gateway beside nginx and the floor, on one machine, one command.

    .venv/bin/python -m benchmarks.speed [--seconds 5] [--rounds 3] [--no-stream]

nginx (Debian) is the upstream (fixed JSON for auth and resources, a sparse 1 GiB file) and,
as a second instance, the efficiency reference: ``proxy_pass`` injecting the same two headers.
wrk (Debian) drives the load. Contenders, interleaved over ``--rounds`` rounds:

* ``direct``: wrk against the upstream itself;
* ``nginx-proxy``: the reference proxy (one worker process);
* ``floor``: :mod:`benchmarks.floor_proxy`, the least an aiohttp proxy does, on uvloop;
* ``gateway``: ``repairy-gateway serve`` with its defaults (access log, metrics, checks, 401
  replay, retries, breaker);
* ``gateway-2w``: the same with ``GATEWAY_WORKERS=2`` (one token, two proxy processes).

For each: requests/s and p50/p99 at 32 connections, p50 at 1 connection (added over
``direct``), CPU microseconds per request from ``/proc`` (summed over every process of the
contender, workers included), idle and peak RSS. Then, through the gateway: a 1 GiB download
(after one unmeasured warm-up download) and upload (MB/s, RSS growth), and p99 under load
while the token renews every ~2.4 s against p99 with a long-lived token. A Markdown table is
printed and saved under ``benchmarks/results/``. nginx and wrk are installed with apt-get when
missing (as root). The numbers are the machine's and its neighbours': compare the rows of one
run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.proxy_overhead import _free_port
from tests.tools import require_binary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PATH = "/workshops/5f1a2b3c4d5e6f7a8b9c0d01/services"
ANSWER = '{"success":true,"data":[{"id":"svc-1","name":"Oil change","price":89.0}]}'
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


def _grant(ttl: int) -> str:
    return json.dumps({"accessToken": "bench-access-token-0123456789abcdef", "refreshToken":
                       "bench-refresh-token-0123456789abcdef", "tokenType": "Bearer",
                       "expiresIn": ttl, "refreshExpiresIn": 1209600}).replace('"', '\\"')


def upstream_conf(d: Path, port: int, sink: int) -> str:
    return f"""
worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 75s; client_max_body_size 0;
  client_body_temp_path {d}/up-body; proxy_temp_path {d}/up-proxy;
  fastcgi_temp_path {d}/up-f; uwsgi_temp_path {d}/up-u; scgi_temp_path {d}/up-s;
  map $uri $grant {{ ~^/short/ "{_grant(3)}"; default "{_grant(172800)}"; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    default_type application/json;
    location ~ /auth/(token|refresh)$ {{ return 200 $grant; }}
    location = /big {{ alias {d}/big.bin; default_type application/octet-stream; }}
    location = /upload {{ proxy_pass http://127.0.0.1:{sink}; proxy_http_version 1.1;
                         proxy_request_buffering off; }}
    location / {{ return 200 '{ANSWER}'; }}
  }}
}}
"""


def reference_conf(d: Path, port: int, upstream: int) -> str:
    return f"""
worker_processes 1; daemon off; pid {d}/ref.pid; error_log {d}/ref.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 75s;
  client_body_temp_path {d}/ref-body; proxy_temp_path {d}/ref-proxy;
  fastcgi_temp_path {d}/ref-f; uwsgi_temp_path {d}/ref-u; scgi_temp_path {d}/ref-s;
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer nginx-token";
      proxy_set_header X-Partner-ID "nginx-partner";
    }}
  }}
}}
"""


# -- processes ---------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(c) for c in text.split()]
    return found


def tree(pid: int) -> list[int]:
    pids = [pid]
    for child in _children(pid):
        pids += tree(child)
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_kib(pids: list[int], key: str = "VmRSS") -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


@dataclass
class Contender:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    idle_rss_kib: int = 0
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    p50_1c_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    peak_rss_kib: int = 0
    idle_rss_max_kib: int = 0  # the largest single process (workers: each one)
    rss_after_round_kib: list[int] = field(default_factory=list)  # the soak: growth over rounds
    requests: float = 0.0

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc is not None else []


def _wait_port(port: int, within: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _wait_ready(admin: int, within: float = 20.0) -> None:
    import urllib.request

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError("the gateway did not become ready")


def gateway_env(upstream_url: str, port: int, admin: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "REPAIRY_BASE_URL": upstream_url, "REPAIRY_APP_KEY": "bench-key",
            "REPAIRY_APP_SECRET": "bench-secret", "REPAIRY_PARTNER_ID": "bench-partner",
            "GATEWAY_LISTEN": f"127.0.0.1:{port}", "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            **extra}


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str] | None, log: Path) -> Iterator[
        subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- wrk ---------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(binary: str, url: str, seconds: float, connections: int) -> dict[str, float]:
    out = subprocess.run([binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                          "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
              "requests": float(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = _ms(m.group(1)) if m else float("nan")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return result


def measure(c: Contender, binary: str, seconds: float) -> None:
    pids = c.pids()
    cpu0 = cpu_seconds(pids)
    r = wrk(binary, c.url + PATH, seconds, 32)
    cpu1 = cpu_seconds(pids)
    if r["non_2xx"]:
        raise RuntimeError(f"{c.name}: {r['non_2xx']:.0f} non-2xx answers")
    c.rps.append(r["rps"])
    c.requests += r["requests"]
    c.p50_ms.append(r["p50"])
    c.p99_ms.append(r["p99"])
    if pids:
        c.cpu_us.append((cpu1 - cpu0) / r["requests"] * 1e6)
    one = wrk(binary, c.url + PATH, max(1.0, seconds / 2), 1)
    c.p50_1c_ms.append(one["p50"])
    c.peak_rss_kib = max(c.peak_rss_kib, rss_kib(pids, "VmHWM"))


# -- streaming and renewal -----------------------------------------------------------------------
async def _chunks(total: int, size: int = 1 << 20) -> AsyncIterator[bytes]:
    block = b"\x5a" * size
    sent = 0
    while sent < total:
        yield block
        sent += size


async def stream(url: str, pids: list[int]) -> dict[str, float]:
    before = rss_kib(pids)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(url + "/big") as resp:  # warm-up: nginx's page cache, windows
            async for _ in resp.content.iter_chunked(1 << 20):
                pass
        t0 = time.perf_counter()
        got = 0
        async with http.get(url + "/big") as resp:
            async for chunk in resp.content.iter_chunked(1 << 20):
                got += len(chunk)
        down = got / (time.perf_counter() - t0) / 1e6
        t0 = time.perf_counter()
        async with http.post(url + "/upload", data=_chunks(GIB)) as resp:
            answer = await resp.json()
            status = resp.status
        if answer.get("size") != GIB:
            raise RuntimeError(f"the upload arrived with {answer.get('size')} bytes")
        up = GIB / (time.perf_counter() - t0) / 1e6
    if got != GIB or status != 200:
        raise RuntimeError(f"streaming failed: {got} bytes down, upload status {status}")
    return {"download_MBps": down, "upload_MBps": up,
            "rss_growth_MiB": (rss_kib(pids, "VmHWM") - before) / 1024}


# -- the run -------------------------------------------------------------------------------------
def run(seconds: float, rounds: int, streaming: bool) -> str:
    nginx = require_binary("nginx", "nginx")
    wrk_bin = require_binary("wrk", "wrk")
    with tempfile.TemporaryDirectory(prefix="repairy-speed-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's workers may run as another user
        with (d / "big.bin").open("wb") as f:
            f.truncate(GIB)  # sparse: nginx reads zeros from the page cache
        (d / "big.bin").chmod(0o644)
        up_port, ref_port = _free_port(), _free_port()
        sink_port = _free_port()
        (d / "up.conf").write_text(upstream_conf(d, up_port, sink_port))
        (d / "ref.conf").write_text(reference_conf(d, ref_port, up_port))
        py = sys.executable
        upstream_url = f"http://127.0.0.1:{up_port}"
        ports = {n: (_free_port(), _free_port()) for n in ("floor", "gateway", "gateway-2w")}
        contenders = [Contender("direct", upstream_url),
                      Contender("nginx-proxy", f"http://127.0.0.1:{ref_port}"),
                      Contender("floor", f"http://127.0.0.1:{ports['floor'][0]}"),
                      Contender("gateway", f"http://127.0.0.1:{ports['gateway'][0]}"),
                      Contender("gateway-2w", f"http://127.0.0.1:{ports['gateway-2w'][0]}")]
        by_name = {c.name: c for c in contenders}
        with contextlib.ExitStack() as stack:
            stack.enter_context(started([nginx, "-p", str(d), "-c", str(d / "up.conf")], None,
                                        d / "up.log"))
            stack.enter_context(started([py, "-m", "benchmarks.speed", "--sink",
                                         str(sink_port)], None, d / "sink.log"))
            _wait_port(up_port)
            _wait_port(sink_port)
            by_name["nginx-proxy"].proc = stack.enter_context(started(
                [nginx, "-p", str(d), "-c", str(d / "ref.conf")], None, d / "ref.log"))
            by_name["floor"].proc = stack.enter_context(started(
                [py, "-m", "benchmarks.floor_proxy", "--listen",
                 f"127.0.0.1:{ports['floor'][0]}", "--upstream", upstream_url], None,
                d / "floor.log"))
            for name, extra in (("gateway", {}), ("gateway-2w", {"GATEWAY_WORKERS": "2"})):
                port, admin = ports[name]
                by_name[name].proc = stack.enter_context(started(
                    [py, "-m", "gateway", "serve"],
                    gateway_env(upstream_url, port, admin, GATEWAY_MAX_BODY_SIZE="0", **extra),
                    d / f"{name}.log"))
                _wait_ready(admin)
            for c in contenders[1:]:
                _wait_port(int(c.url.rpartition(":")[2]))
            time.sleep(1.0)
            for c in contenders:
                c.idle_rss_kib = rss_kib(c.pids())
                c.idle_rss_max_kib = max((rss_kib([pid]) for pid in c.pids()), default=0)
                wrk(wrk_bin, c.url + PATH, 1, 8)  # warm up: connections, caches
            for _ in range(rounds):
                for c in contenders:
                    measure(c, wrk_bin, seconds)
                    c.rss_after_round_kib.append(rss_kib(c.pids()))
            extra_rows: dict[str, Any] = {}
            if streaming:
                extra_rows["stream"] = asyncio.run(stream(by_name["gateway"].url,
                                                          by_name["gateway"].pids()))
            extra_rows["renewal"] = renewal(d, py, upstream_url, wrk_bin, seconds)
        return report(contenders, extra_rows, seconds, rounds)


def renewal(d: Path, py: str, upstream_url: str, wrk_bin: str, seconds: float) -> dict[str, Any]:
    """p99 at 32 connections with a token renewed every ~2.4 s against a 48 h token."""
    out: dict[str, Any] = {}
    for label, base in (("steady", upstream_url), ("renewing", upstream_url + "/short")):
        port, admin = _free_port(), _free_port()
        env = gateway_env(base, port, admin, GATEWAY_TOKEN_EXPIRY_MARGIN="0.3s",
                          GATEWAY_RENEW_JITTER_FRACTION="0.05")
        with started([py, "-m", "gateway", "serve"], env, d / f"renew-{label}.log"):
            _wait_ready(admin)
            wrk(wrk_bin, f"http://127.0.0.1:{port}{PATH}", 1, 8)
            # Long enough for a few renewals (one every ~2.4 s): 6 s runs at the default 5 s.
            runs = [wrk(wrk_bin, f"http://127.0.0.1:{port}{PATH}", max(3, round(seconds * 1.2)),
                        32) for _ in range(2)]
        out[label] = statistics.median(r["p99"] for r in runs)
        out[f"{label}_non_2xx"] = sum(r["non_2xx"] for r in runs)
    out["ratio"] = out["renewing"] / out["steady"]
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(contenders: list[Contender], extra: dict[str, Any], seconds: float,
           rounds: int) -> str:
    by = {c.name: c for c in contenders}
    ref_rps = _med(by["nginx-proxy"].rps)
    direct_1c = _med(by["direct"].p50_1c_ms)
    lines = [
        f"# repairy-gateway speed, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}. wrk -t1, {seconds:g} s runs, {rounds} rounds "
        "interleaved, medians; 1-connection runs half as long.",
        "",
        "| contender | req/s | ratio to nginx-proxy | p50 ms | p99 ms | CPU µs/req | "
        "added p50 at 1 conn (µs) | idle RSS MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        cpu = f"{_med(c.cpu_us):.0f}" if c.cpu_us else "-"
        added = (_med(c.p50_1c_ms) - direct_1c) * 1000
        idle = f"{c.idle_rss_kib / 1024:.1f}" if c.proc else "-"
        peak = f"{c.peak_rss_kib / 1024:.1f}" if c.proc else "-"
        lines.append(f"| {c.name} | {_med(c.rps):,.0f} | {_med(c.rps) / ref_rps:.2f} | "
                     f"{_med(c.p50_ms):.2f} | {_med(c.p99_ms):.2f} | {cpu} | "
                     f"{'-' if c.name == 'direct' else f'{added:+.0f}'} | {idle} | {peak} |")
    gw, floor = by["gateway"], by["floor"]
    lines += [
        "",
        "Goals (same run):",
        f"- gateway CPU per request / floor's: {_med(gw.cpu_us) / _med(floor.cpu_us):.2f}x "
        "(goal <= 1.25x)",
        f"- gateway added p50 at 1 connection - floor's: "
        f"{(_med(gw.p50_1c_ms) - _med(floor.p50_1c_ms)) * 1000:+.0f} µs (goal <= +50 µs)",
        f"- 2 workers / 1 worker throughput: {_med(by['gateway-2w'].rps) / _med(gw.rps):.2f}x "
        "(goal >= 1.3x)",
    ]
    for name in ("gateway", "gateway-2w"):
        c = by[name]
        grown = (c.rss_after_round_kib[-1] - c.rss_after_round_kib[0]) / 1024
        lines.append(f"- {name}: idle RSS {c.idle_rss_max_kib / 1024:.1f} MiB for its largest "
                     f"process (goal <= 50 MB each); RSS {grown:+.1f} MiB from the first round "
                     f"to the last, over {c.requests:,.0f} requests (goal: no growth)")
    if "stream" in extra:
        s = extra["stream"]
        lines.append(f"- 1 GiB through the gateway: download {s['download_MBps']:.0f} MB/s, "
                     f"upload {s['upload_MBps']:.0f} MB/s, peak RSS growth "
                     f"{s['rss_growth_MiB']:.1f} MiB (goals >= 300 MB/s, <= 32 MiB)")
    r = extra["renewal"]
    lines.append(f"- p99 while the token renews every ~2.4 s: {r['renewing']:.2f} ms against "
                 f"{r['steady']:.2f} ms steady ({r['ratio']:.2f}x, goal <= 1.5x; non-2xx "
                 f"{r['renewing_non_2xx']:.0f})")
    return "\n".join(lines) + "\n"


def sink(port: int) -> None:
    """The upload target behind nginx: reads the whole body, answers its size."""
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"size": size})

    async def serve() -> None:
        server = web.Server(handler, access_log=None)
        await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-stream", action="store_true", help="skip the 1 GiB transfers")
    parser.add_argument("--save", action="store_true", default=True)
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args()
    if args.sink:
        sink(args.sink)
        return
    table = run(args.seconds, args.rounds, not args.no_stream)
    print(table)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"speed-{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
        path.write_text(table)
        print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
