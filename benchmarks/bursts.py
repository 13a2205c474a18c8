"""Why latency grows faster than CPU under a little concurrency: the same 1,000 requests/s
sent as one stream and as four connections that tick together, through the floor and the
gateway (and the gateway without its access line, and on asyncio's loop instead of uvloop).

    .venv/bin/python -m benchmarks.bursts [--seconds 10] [--rounds 3]

``hey -c 4 -q 250`` (the fixed-rate table's load) starts four workers at once, each on its own
250/s ticker: their requests arrive four at a time every 4 ms, so on a single-threaded proxy
the second waits for the first, the third for two, the fourth for three. ``hey -c 1 -q 1000``
sends the same rate one request at a time. If the gap between the two is the burst, it grows
with the CPU a request takes (the floor's and the gateway's alike), and the variants change
it only as much as they change that CPU. Medians over interleaved rounds; latency in hey's
0.1 ms steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.fixed_rate import hey
from benchmarks.harness import PATH, contenders_up, cpu_seconds
from tests.tools import require_binary

VARIANTS = {"gateway-no-access-line": {"GATEWAY_LOG_LEVEL": "warning"},
            "gateway-asyncio": {"GATEWAY_EVENT_LOOP": "asyncio"}}
LOADS = (("1 x 1000/s", 1, 1000.0), ("4 x 250/s", 4, 1000.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hey_bin = require_binary("hey", "hey")
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="repairy-bursts-") as tmp, contenders_up(
            Path(tmp), ("floor", "gateway"), variants=VARIANTS) as (contenders, _):
        for c in contenders:
            hey(hey_bin, c.url + PATH, 1000, 4, 1)  # warm up
        for _ in range(args.rounds):
            for label, connections, rate in LOADS:
                for c in contenders:
                    pids = c.pids()
                    cpu0, t0 = cpu_seconds(pids), time.monotonic()
                    r = hey(hey_bin, c.url + PATH, rate, connections, args.seconds)
                    wall = time.monotonic() - t0
                    r["cpu_us"] = ((cpu_seconds(pids) - cpu0) / r["requests"] * 1e6
                                   if pids and r["requests"] else float("nan"))
                    r["wall"] = wall
                    rows.setdefault((label, c.name), []).append(r)
    names = [c.name for c in contenders]
    print(f"hey, {args.seconds:g} s runs, {args.rounds} rounds interleaved, medians "
          "(latency in ms, 0.1 ms steps; CPU per request in µs)")
    print()
    print("| load | contender | achieved req/s | CPU µs/req | p50 | p90 | p99 | added p50 | "
          "added p90 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _, _ in LOADS:
        direct = rows[(label, "direct")]
        for name in names:
            runs = rows[(label, name)]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            added = ("-", "-") if name == "direct" else tuple(
                f"{med(k) - statistics.median(r[k] for r in direct):+.2f}" for k in ("p50", "p90"))
            cpu = "-" if name == "direct" else f"{med('cpu_us'):.0f}"
            print(f"| {label} | {name} | {med('rps'):,.0f} | {cpu} | {med('p50'):.2f} | "
                  f"{med('p90'):.2f} | {med('p99'):.2f} | {added[0]} | {added[1]} |")


if __name__ == "__main__":
    main()
