"""The cost of choosing a credential profile per request (:meth:`gateway.proxy.lanes.Lanes.
choose`), in nanoseconds per call: the best of ``--rounds`` timings of ``--calls`` calls each,
for the cases a request meets (no header without client keys is the fast path in admission
and never calls it).

    python -m benchmarks.profile_choice [--profiles 3] [--calls 200000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from gateway.proxy.access import parse_client_profiles
from gateway.proxy.lanes import Lane, Lanes

GOAL_NS = 5000.0


def lanes(count: int) -> Lanes:
    fake: Any = object()  # the choice reads only the lanes' names
    names = ["default", *(f"p{i}" for i in range(1, count))]
    grants = parse_client_profiles(f"billing={'|'.join(reversed(names))}, *=default")
    return Lanes([Lane(name, fake, fake, fake, fake, fake) for name in names], grants)


def best_ns(call: Any, calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter_ns() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    chooser = lanes(args.profiles)
    last = f"p{args.profiles - 1}" if args.profiles > 1 else "default"
    cases = {
        "named, no client keys": lambda: chooser.choose(last, "anonymous", False),
        "client's default (keys on)": lambda: chooser.choose(None, "billing", True),
        "named, allowed (keys on)": lambda: chooser.choose(last, "billing", True),
        "unlisted client's default": lambda: chooser.choose(None, "web", True),
    }
    print(f"profile choice, {args.profiles} profiles, best of {args.rounds} x {args.calls}:")
    worst = 0.0
    for what, call in cases.items():
        ns = best_ns(call, args.calls, args.rounds)
        worst = max(worst, ns)
        print(f"  {what:<28} {ns:8.0f} ns")
    print(f"worst {worst:.0f} ns: {'within' if worst <= GOAL_NS else 'OVER'} the "
          f"{GOAL_NS:.0f} ns goal")


if __name__ == "__main__":
    main()
