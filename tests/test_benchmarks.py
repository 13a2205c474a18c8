"""Smoke tests of the benchmark harnesses: they run end to end from a clean checkout (nginx and
wrk are installed on demand) and print what they promise. Their numbers are not asserted: the
machine is shared and noisy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.tools import require_binary

CATEGORY = "system"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_speed_harness_runs_every_contender_for_a_second() -> None:
    require_binary("nginx", "nginx")
    require_binary("wrk", "wrk")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--seconds", "1", "--rounds", "1",
         "--no-stream", "--no-save"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout
    for contender in ("direct", "nginx-proxy", "floor", "gateway", "gateway-2w"):
        assert f"| {contender} |" in table
    assert "gateway CPU per request / floor's" in table
    assert "2 workers / 1 worker throughput" in table
    assert "p99 while the token renews" in table
    assert "non-2xx 0)" in table  # every renewal under load went unnoticed by callers


def test_benchmarks_speed_fixed_rate_mode_runs_briefly_with_a_baseline_build() -> None:
    """The fixed-rate table (hey at 1,000 requests/s) for nginx, the floor and the gateway,
    with this same checkout as the baseline build of a paired run."""
    require_binary("nginx", "nginx")
    require_binary("hey", "hey")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--fixed-rate", "--rate-seconds", "2",
         "--rounds", "1", "--only", "nginx-proxy,floor,gateway", "--baseline", str(ROOT),
         "--no-save"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"contender", "direct", "nginx-proxy", "floor", "gateway", "baseline"}
    for name in ("nginx-proxy", "floor", "gateway", "baseline"):
        achieved, vcpu = rows[name][0], rows[name][1]
        assert 0 < float(achieved.replace(",", "")) <= 1100, table  # never above the rate
        assert 0 < float(vcpu) < 2, table
    assert "vCPU per 1,000 requests/s (goal <= 0.25" in table


def test_benchmarks_instructions_counts_floor_and_gateway_under_callgrind() -> None:
    """Instructions per request under callgrind: a figure for each, the gateway's above the
    floor's (it does everything the floor does, and more)."""
    require_binary("nginx", "nginx")
    require_binary("hey", "hey")
    require_binary("valgrind", "valgrind")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--requests", "200"], cwd=ROOT,
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = {line.split()[0]: float(line.split()[1].replace(",", ""))
               for line in result.stdout.splitlines()[1:]}
    assert 50_000 < figures["floor"] < figures["gateway"] < 10_000_000, result.stdout


def test_benchmarks_idempotency_flood_real_memory_stays_within_the_limit() -> None:
    """The store's byte count is honest: under a flood of distinct keys with booking-sized
    answers, what Python really holds for the store stays within the configured limit."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.idempotency_flood", "--keys", "12000",
         "--max-bytes", "4MiB"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    ratio = float(result.stdout.rsplit("real / limit", 1)[1].split()[0])
    assert 0.8 <= ratio <= 1.02, result.stdout
    assert "evicted" in result.stdout


def test_benchmarks_redis_sharing_bound_leaves_room_for_a_booking() -> None:
    """The shared cache's flood within its bound, on a real noeviction redis-server: what the
    cache counts is what Redis holds (within a third), and a booking can still be claimed."""
    require_binary("redis-server", "redis-server")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.redis_sharing", "--entries", "8000", "--body",
         "2000", "--bound", "6MiB", "--maxmemory", "24mb"], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a booking's claim     claimed" in result.stdout
    assert "failed writes         0 (-)" in result.stdout
    ratio = float(result.stdout.split("real / counted")[1].split()[0])
    assert 0.8 < ratio < 1.35, result.stdout


def test_benchmarks_refusals_prints_the_readiness_and_contention_figures() -> None:
    """The wrong-Partner-ID figures (start to partner_refused, SIGHUP to ready) and the
    contention figures come out as JSON; the behaviour bounds the issue sets hold."""
    import json

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.refusals", "--contention-seconds", "4"], cwd=ROOT,
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    wrong = figures["wrong_partner_id"]
    assert wrong["start_to_partner_refused_s"] is not None
    assert wrong["start_to_partner_refused_s"] < 15
    assert wrong["sighup_to_ready_s"] is not None and wrong["sighup_to_ready_s"] < 5 + 2
    contention = figures["contention"]
    assert contention["detected_after_s"] is not None and contention["detected_after_s"] < 60
    assert set(contention["answers_after_detection"]) <= {"200", "503 credential_contention"}


def test_benchmarks_shares_patches_all_still_apply(tmp_path: Path) -> None:
    """Every feature switch of benchmarks/shares.py still finds its text in the source, and
    the patched copy still compiles (a renamed line would otherwise measure nothing)."""
    import compileall

    from benchmarks.shares import FEATURES, scratch_copy

    for name, (_, patches, _) in FEATURES.items():
        copy = scratch_copy(patches, tmp_path / name)
        assert compileall.compile_dir(copy / "gateway", quiet=1), name
