"""The fixed-rate comparison: a steady 1,000 requests/s through each contender, the way sidecar
users compare proxies (vCPU per 1,000 requests/s, and latency added at p50/p90/p99 over
calling the upstream directly).

    .venv/bin/python -m benchmarks.speed --fixed-rate [--rate 1000] [--rate-seconds 15]

The load comes from Debian's ``hey`` (``-c 4 -q 250``: four keep-alive connections, each
sending at most 250 requests a second), as the issue that asked for this table proposed. No
truly open-loop generator installs here (wrk2, vegeta, fortio and oha are in neither Debian
nor PyPI, and no Go module proxy is reachable for vegeta's module; autocannon on npm would
share the two cores with a Node.js process). hey's limits, to read the table by: each
connection waits for its answer before its next tick (a stall
sends fewer requests rather than queueing them: the achieved rate is in the table, so a
contender that cannot keep up shows, as do requests that failed, which hey leaves out of its
CSV), and it reports latency in 0.1 ms steps (the added figures are differences of such
steps). vCPU is over the run's wall time, hey's start and stop included (a few ms in 15 s).

CPU is the contender's whole process tree (``/proc``, workers included), over the run's wall
time, divided by the achieved rate; RSS the tree's after the run.
"""

from __future__ import annotations

import collections
import statistics
import subprocess
import time

from benchmarks.harness import PATH, Contender, cpu_seconds, rss_kib


def _pct(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of sorted ``values``."""
    if not values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def hey(binary: str, url: str, rate: float, connections: int, seconds: float) -> dict[str, float]:
    """One hey run: requests, achieved rate, latency percentiles (ms), non-2xx answers."""
    out = subprocess.run([binary, "-c", str(connections), "-q", f"{rate / connections:g}",
                          "-z", f"{seconds:g}s", "-o", "csv", url],
                         capture_output=True, text=True, check=True).stdout
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    for row in out.splitlines()[1:]:
        cells = row.split(",")
        if len(cells) >= 7:
            latencies.append(float(cells[0]) * 1000)
            statuses[cells[6]] += 1
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / seconds,
            "p50": _pct(latencies, 50), "p90": _pct(latencies, 90),
            "p99": _pct(latencies, 99),
            "non_2xx": sum(n for s, n in statuses.items() if not s.startswith("2"))}


def measure_fixed(c: Contender, binary: str, rate: float, connections: int,
                  seconds: float) -> None:
    """One fixed-rate run of ``c``, appended to ``c.fixed``."""
    pids = c.pids()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    r = hey(binary, c.url + PATH, rate, connections, seconds)
    wall, cpu = time.monotonic() - t0, cpu_seconds(pids) - cpu0
    if r["non_2xx"]:
        raise RuntimeError(f"{c.name}: {r['non_2xx']:.0f} non-2xx answers at a fixed rate")
    if pids and r["rps"]:
        r["vcpu_per_1000"] = cpu / wall / (r["rps"] / 1000)
        r["rss_mib"] = rss_kib(pids) / 1024
    c.fixed.append(r)


def _med(c: Contender, key: str) -> float:
    values = [r[key] for r in c.fixed if key in r]
    return statistics.median(values) if values else float("nan")


def _spread(c: Contender, key: str, base: list[float] | None = None) -> str:
    values = [r[key] - (base[i] if base else 0.0) for i, r in enumerate(c.fixed) if key in r]
    return f"{min(values):.2f} to {max(values):.2f}" if values else "-"


def report_fixed(contenders: list[Contender], rate: float, connections: int,
                 seconds: float) -> list[str]:
    """The fixed-rate table and its goals (medians over rounds; the spread of the gateway's
    figures beside them)."""
    direct = next(c for c in contenders if c.name == "direct")
    lines = [
        f"Fixed rate: hey -c {connections} -q {rate / connections:g} (≈{rate:,.0f} requests/s), "
        f"{seconds:g} s runs, {len(direct.fixed)} rounds interleaved, medians; latency in "
        "0.1 ms steps.",
        "",
        "| contender | achieved req/s | vCPU per 1,000 req/s | p50 ms | p90 ms | p99 ms | "
        "added p50 ms | added p90 ms | added p99 ms | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        vcpu = _med(c, "vcpu_per_1000")
        added = ["-" if c is direct else f"{_med(c, k) - _med(direct, k):+.2f}"
                 for k in ("p50", "p90", "p99")]
        rss = _med(c, "rss_mib")
        lines.append(f"| {c.name} | {_med(c, 'rps'):,.0f} | "
                     f"{'-' if vcpu != vcpu else f'{vcpu:.3f}'} | {_med(c, 'p50'):.2f} | "
                     f"{_med(c, 'p90'):.2f} | {_med(c, 'p99'):.2f} | {' | '.join(added)} | "
                     f"{'-' if rss != rss else f'{rss:.1f}'} |")
    lines += ["", "Goals (same run):"]
    direct_p90 = [r["p90"] for r in direct.fixed]
    for c in contenders:
        if c.name not in ("gateway", "baseline"):
            continue
        lines.append(
            f"- {c.name}: {_med(c, 'vcpu_per_1000'):.3f} vCPU per 1,000 requests/s (goal <= "
            f"0.25; rounds {_spread(c, 'vcpu_per_1000')}), added p90 "
            f"{_med(c, 'p90') - _med(direct, 'p90'):+.2f} ms (goal <= 1.0 ms; rounds "
            f"{_spread(c, 'p90', direct_p90)})")
    return lines
