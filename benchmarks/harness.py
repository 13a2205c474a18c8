"""The pieces the speed benchmarks share: nginx as the upstream and as the reference proxy, the
contenders' processes (CPU and RSS read from ``/proc`` over a whole process tree), and wrk.

Used by :mod:`benchmarks.speed`, :mod:`benchmarks.fixed_rate` and :mod:`benchmarks.profile`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    #: The fixed-rate runs (:mod:`benchmarks.fixed_rate`): one dict per round.
    fixed: list[dict[str, float]] = field(default_factory=list)

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
def started(args: list[str], env: dict[str, str] | None, log: Path,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
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


@contextlib.contextmanager
def nginx_upstream(d: Path, sink_port: int = 0) -> Iterator[str]:
    """nginx as the upstream (fixed JSON answers, :func:`upstream_conf`), running from ``d``
    until the block ends; yields its URL. ``sink_port``: where its ``/upload`` goes."""
    from benchmarks.proxy_overhead import _free_port
    from tests.tools import require_binary

    nginx = require_binary("nginx", "nginx")
    d.chmod(0o755)  # nginx's workers may run as another user
    port = _free_port()
    (d / "up.conf").write_text(upstream_conf(d, port, sink_port or _free_port()))
    with started([nginx, "-p", str(d), "-c", str(d / "up.conf")], None, d / "up.log"):
        _wait_port(port)
        yield f"http://127.0.0.1:{port}"


#: Every contender, in the order they run; ``direct`` is always measured (added latency is
#: over it), ``baseline`` only with a baseline checkout.
CONTENDERS = ("direct", "nginx-proxy", "floor", "gateway", "gateway-2w", "baseline")


@contextlib.contextmanager
def contenders_up(d: Path, names: tuple[str, ...], baseline: Path | None = None,
                  variants: dict[str, dict[str, str]] | None = None) -> Iterator[
        tuple[list[Contender], str]]:
    """nginx as the upstream (and the upload sink behind it), then each named contender,
    started and ready; yields them and the upstream's URL. ``baseline``: a checkout of another
    build of the gateway, run as the contender ``baseline`` (for paired A/B runs: the same
    settings, interleaved with ``gateway``). ``variants``: more gateways, by name, each with
    settings of its own (run last)."""
    import sys

    from benchmarks.proxy_overhead import _free_port
    from tests.tools import require_binary

    nginx = require_binary("nginx", "nginx")
    d.chmod(0o755)  # nginx's workers may run as another user
    with (d / "big.bin").open("wb") as f:
        f.truncate(GIB)  # sparse: nginx reads zeros from the page cache
    (d / "big.bin").chmod(0o644)
    ref_port, sink_port = _free_port(), _free_port()
    py = sys.executable
    wanted = [n for n in CONTENDERS if n == "direct" or n in names]
    if baseline is None and "baseline" in wanted:
        wanted.remove("baseline")
    variants = variants or {}
    wanted += list(variants)
    ports = {n: (_free_port(), _free_port()) for n in wanted}
    with contextlib.ExitStack() as stack:
        upstream_url = stack.enter_context(nginx_upstream(d, sink_port))
        (d / "ref.conf").write_text(
            reference_conf(d, ref_port, int(upstream_url.rpartition(":")[2])))
        contenders = [Contender(n, upstream_url if n == "direct" else
                                f"http://127.0.0.1:"
                                f"{ref_port if n == 'nginx-proxy' else ports[n][0]}")
                      for n in wanted]
        stack.enter_context(started([py, "-m", "benchmarks.speed", "--sink", str(sink_port)],
                                    None, d / "sink.log", cwd=ROOT))
        _wait_port(sink_port)
        for c in contenders:
            port, admin = ports[c.name]
            if c.name == "nginx-proxy":
                c.proc = stack.enter_context(started(
                    [nginx, "-p", str(d), "-c", str(d / "ref.conf")], None, d / "ref.log"))
            elif c.name == "floor":
                c.proc = stack.enter_context(started(
                    [py, "-m", "benchmarks.floor_proxy", "--listen", f"127.0.0.1:{port}",
                     "--upstream", upstream_url], None, d / "floor.log", cwd=ROOT))
            elif c.name != "direct":
                extra = ({"GATEWAY_WORKERS": "2"} if c.name == "gateway-2w"
                         else variants.get(c.name, {}))
                c.proc = stack.enter_context(started(
                    [py, "-m", "gateway", "serve"],
                    gateway_env(upstream_url, port, admin, GATEWAY_MAX_BODY_SIZE="0", **extra),
                    d / f"{c.name}.log", cwd=baseline if c.name == "baseline" else ROOT))
                _wait_ready(admin)
        for c in contenders[1:]:
            _wait_port(int(c.url.rpartition(":")[2]))
        time.sleep(1.0)
        for c in contenders:
            c.idle_rss_kib = rss_kib(c.pids())
            c.idle_rss_max_kib = max((rss_kib([pid]) for pid in c.pids()), default=0)
        yield contenders, upstream_url
