"""The fault soak (``benchmarks/soak.py``): 60 s of random faults against real processes in
CI, 0 breaches; and its checks, shown to catch each kind of breach they look for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.soak_checks import Checks, Tally
from benchmarks.soak_parts import AofRedis, Replica
from gateway.sandbox import Sandbox, SandboxConfig
from tests.tools import require_binary

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
BODY = {"workshopId": "", "startTime": "2027-03-01T09:00:00+11:00",
        "serviceType": "Logbook service",
        "customer": {"firstName": "Sam", "lastName": "Lee", "email": "sam@example.com",
                     "phone": "+61400000002"},
        "car": {"rego": "ABC123", "make": "Toyota", "model": "Corolla", "year": 2019}}


def test_soak_sixty_seconds_of_faults_breach_nothing() -> None:
    """Every fault kind at least once in 60 s; every invariant holds (the seed is printed, so
    a failure here can be replayed with ``--seed``)."""
    require_binary("redis-server", "redis-server")
    result = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--minutes", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=420, check=False)
    out = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, out
    assert "- breaches: 0" in result.stdout, out
    faults = result.stdout.split("- faults injected: ")[1].splitlines()[0]
    for kind in ("worker_kill", "supervisor_kill", "redis_kill", "redis_replies_lost",
                 "repairy_5xx", "repairy_resets", "slow_answers", "slow_auth",
                 "credential_rotation", "acted_answer_lost", "refresh_answer_lost"):
        assert f"{kind} " in faults, out
    assert "2xx answers 0 " not in result.stdout, out


async def test_soak_checks_catch_each_breach(tmp_path: Path) -> None:
    """The checks are not blind: a second booking for one key, an answer made for another
    client, a booking the sandbox does not hold, a traceback, an unstructured line, a
    500 internal_error, and logins above the bound are each reported."""
    async with Sandbox(SandboxConfig()) as sb:
        workshop = next(iter(sb.state.data.workshops))
        tally = Tally()
        replica = Replica.create("a", sb, {})
        checks = Checks(sb, [replica], AofRedis.__new__(AofRedis), tally)
        first = sb.state.data.create_booking("p", {**BODY, "workshopId": workshop,
                                                   "notes": "soak|alpha|k1"})
        checks.check_bookings()
        assert tally.breaches == []
        assert tally.answer(sb, "alpha", "k1", {"data": first}, False) == first["id"]
        sb.state.data.create_booking("p", {**BODY, "workshopId": workshop,
                                           "notes": "soak|alpha|k1"})
        checks.check_bookings()
        assert len(tally.breaches) == 1 and "two bookings" in tally.breaches[0]
        assert tally.answer(sb, "beta", "k1", {"data": first}, False) is None
        assert "got the answer made for" in tally.breaches[-1]
        ghost = {**first, "id": "0" * 24, "notes": "soak|alpha|k2"}
        assert tally.answer(sb, "alpha", "k2", {"data": ghost}, False) is None
        assert "does not hold" in tally.breaches[-1]
        before = len(tally.breaches)
        for line in ('{"level": "info", "event": "token_renewal", "outcome": "success"}',
                     'Traceback (most recent call last):',
                     'Exception in callback foo',
                     '{"level": "error", "event": "request", "code": "internal_error"}',
                     '{"level": "error", "event": "task_failed", "task": "x"}'):
            checks._line("a", line)
        assert len(tally.breaches) == before + 4, tally.breaches[before:]
        tally.faults["redis_kill"] = 1
        for _ in range(3):
            sb.state.control.counters["logins_succeeded"] += 1
        checks.finish(sb)
        assert "3 logins > 2 allowed" in tally.breaches[-1]
        replica.proc.log.unlink()
