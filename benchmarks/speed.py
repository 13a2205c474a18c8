"""The speed benchmark: the gateway beside nginx and the floor, on one machine, one command.

    .venv/bin/python -m benchmarks.speed [--seconds 5] [--rounds 3] [--no-stream]
    .venv/bin/python -m benchmarks.speed --fixed-rate [--rate 1000] [--rate-seconds 15]
    .venv/bin/python -m benchmarks.speed --baseline ../other-checkout [--only floor,gateway]

nginx (Debian) is the upstream (fixed JSON for auth and resources, a sparse 1 GiB file) and,
as a second instance, the efficiency reference: ``proxy_pass`` injecting the same two headers.
wrk (Debian) drives the load. Contenders, interleaved over ``--rounds`` rounds:

* ``direct``: wrk against the upstream itself;
* ``nginx-proxy``: the reference proxy (one worker process);
* ``floor``: :mod:`benchmarks.floor_proxy`, the least an aiohttp proxy does, on uvloop;
* ``gateway``: ``repairy-gateway serve`` with its defaults (access log, metrics, checks, 401
  replay, retries, breaker);
* ``gateway-2w``: the same with ``GATEWAY_WORKERS=2`` (one token, two proxy processes);
* ``baseline`` (with ``--baseline DIR``): the gateway of another checkout (another build), with
  the same settings, interleaved with ``gateway``: a paired A/B run of two builds.

``--only`` runs some of them (``direct`` always runs: latency is added over it).

For each: requests/s and p50/p99 at 32 connections, p50 at 1 connection (added over
``direct``), CPU microseconds per request from ``/proc`` (summed over every process of the
contender, workers included), idle and peak RSS. Then, through the gateway: a 1 GiB download
(after one unmeasured warm-up download) and upload (MB/s, RSS growth), and p99 under load
while the token renews every ~2.4 s against p99 with a long-lived token. A Markdown table is
printed and saved under ``benchmarks/results/``. nginx and wrk are installed with apt-get when
missing (as root). The numbers are the machine's and its neighbours': compare the rows of one
run, not runs of different machines.

``--fixed-rate`` runs :mod:`benchmarks.fixed_rate` instead: hey at a steady rate, vCPU per
1,000 requests/s and latency added at p50/p90/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.fixed_rate import measure_fixed, report_fixed
from benchmarks.harness import (
    CONTENDERS,
    GIB,
    PATH,
    RESULTS,
    ROOT,
    Contender,
    _wait_ready,
    contenders_up,
    gateway_env,
    measure,
    rss_kib,
    started,
    wrk,
)
from benchmarks.proxy_overhead import _free_port
from tests.tools import require_binary


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
def run(seconds: float, rounds: int, streaming: bool, names: tuple[str, ...] = CONTENDERS,
        baseline: Path | None = None, renewing: bool = True) -> str:
    """The closed-loop run (wrk at 32 connections and at 1): the table, with its goals.
    ``renewing``: also p99 while the token renews (its own two gateways)."""
    wrk_bin = require_binary("wrk", "wrk")
    with tempfile.TemporaryDirectory(prefix="repairy-speed-") as tmp:
        d = Path(tmp)
        with contenders_up(d, names, baseline) as (contenders, upstream_url):
            by_name = {c.name: c for c in contenders}
            for c in contenders:
                wrk(wrk_bin, c.url + PATH, 1, 8)  # warm up: connections, caches
            for _ in range(rounds):
                for c in contenders:
                    measure(c, wrk_bin, seconds)
                    c.rss_after_round_kib.append(rss_kib(c.pids()))
            extra_rows: dict[str, Any] = {}
            if streaming and "gateway" in by_name:
                extra_rows["stream"] = asyncio.run(stream(by_name["gateway"].url,
                                                          by_name["gateway"].pids()))
            if renewing:
                extra_rows["renewal"] = renewal(d, sys.executable, upstream_url, wrk_bin,
                                                seconds)
        return report(contenders, extra_rows, seconds, rounds)


def run_fixed(rate: float, seconds: float, rounds: int, names: tuple[str, ...],
              baseline: Path | None = None, connections: int = 4) -> str:
    """The fixed-rate run (:mod:`benchmarks.fixed_rate`), contenders interleaved."""
    hey_bin = require_binary("hey", "hey")
    with tempfile.TemporaryDirectory(prefix="repairy-speed-") as tmp:
        with contenders_up(Path(tmp), names, baseline) as (contenders, _):
            for c in contenders:  # warm up: connections, caches
                measure_fixed(c, hey_bin, rate, connections, 1)
                c.fixed.clear()
            for _ in range(rounds):
                for c in contenders:
                    measure_fixed(c, hey_bin, rate, connections, seconds)
        return "\n".join([_title(), "", *report_fixed(contenders, rate, connections, seconds)]
                         ) + "\n"


def _title() -> str:
    return (f"# repairy-gateway speed, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
            f"Python {platform.python_version()}.")


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
    ref_rps = _med(by["nginx-proxy"].rps) if "nginx-proxy" in by else float("nan")
    direct_1c = _med(by["direct"].p50_1c_ms)
    lines = [
        _title() + f" wrk -t1, {seconds:g} s runs, {rounds} rounds interleaved, medians; "
        "1-connection runs half as long.",
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
        ratio = f"{_med(c.rps) / ref_rps:.2f}" if ref_rps == ref_rps else "-"  # NaN: no nginx
        lines.append(f"| {c.name} | {_med(c.rps):,.0f} | {ratio} | "
                     f"{_med(c.p50_ms):.2f} | {_med(c.p99_ms):.2f} | {cpu} | "
                     f"{'-' if c.name == 'direct' else f'{added:+.0f}'} | {idle} | {peak} |")
    lines += ["", "Goals (same run):"]
    floor = by.get("floor")
    for name in ("gateway", "baseline"):
        gw = by.get(name)
        if gw is None or floor is None:
            continue
        ratios = [g / f for g, f in zip(gw.cpu_us, floor.cpu_us, strict=True)]
        lines += [
            f"- {name} CPU per request / floor's: {_med(gw.cpu_us) / _med(floor.cpu_us):.2f}x "
            f"(goal <= 1.5x; rounds {min(ratios):.2f} to {max(ratios):.2f}x)",
            f"- {name} added p50 at 1 connection - floor's: "
            f"{(_med(gw.p50_1c_ms) - _med(floor.p50_1c_ms)) * 1000:+.0f} µs (goal <= +50 µs)"]
    if "gateway" in by and "gateway-2w" in by:
        lines.append(f"- 2 workers / 1 worker throughput: "
                     f"{_med(by['gateway-2w'].rps) / _med(by['gateway'].rps):.2f}x (goal >= 1.3x)")
    for name in ("gateway", "gateway-2w", "baseline"):
        if name not in by:
            continue
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
    if "renewal" in extra:
        r = extra["renewal"]
        lines.append(f"- p99 while the token renews every ~2.4 s: {r['renewing']:.2f} ms "
                     f"against {r['steady']:.2f} ms steady ({r['ratio']:.2f}x, goal <= 1.5x; "
                     f"non-2xx {r['renewing_non_2xx']:.0f})")
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
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help="contenders to run, comma-separated (direct always runs)")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of another build, run as the contender 'baseline'")
    parser.add_argument("--fixed-rate", action="store_true",
                        help="hey at a fixed rate instead of wrk's closed loop")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--rate-seconds", type=float, default=15.0)
    parser.add_argument("--save", action="store_true", default=True)
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args()
    if args.sink:
        sink(args.sink)
        return
    names = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if args.baseline is not None:
        if not (args.baseline / "gateway" / "__init__.py").is_file():
            parser.error(f"{args.baseline} is not a checkout of repairy-gateway")
        names = (*names, "baseline") if "baseline" not in names else names
    if args.fixed_rate:
        table = run_fixed(args.rate, args.rate_seconds, args.rounds, names,
                          args.baseline and args.baseline.resolve())
    else:
        table = run(args.seconds, args.rounds, not args.no_stream, names,
                    args.baseline and args.baseline.resolve(),
                    renewing=args.only == parser.get_default("only"))
    print(table)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        kind = "fixed-" if args.fixed_rate else ""
        path = RESULTS / f"speed-{kind}{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
        path.write_text(table)
        print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
