"""Errors and cancellation never vanish, and one clock drives every wait (issue 21, §3-§4).

In-process: the token manager on a fake clock with a scripted auth client, the task helpers,
a gateway start that fails after its listeners are bound, ``serve``'s start-up probe, the
retry back-off, the fleet's waits and jitter, and the credential file polling."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway.app as app_module
from gateway.app import GatewayServer, serve
from gateway.errors import TokenUnavailable
from gateway.metrics import Metrics
from gateway.proxy.retry import Attempts
from gateway.sandbox import Sandbox
from gateway.settings import Settings
from gateway.tasks import cancel_and_wait, sleep_or_set
from gateway.token.auth_client import AuthClient, ProbeResult
from gateway.token.config import PartnerConfig
from gateway.token.fleet import Fleet
from gateway.token.fleet_sync import FleetSync
from gateway.token.manager import TokenManager
from gateway.token.value import Token
from gateway.wiring import build_upstream, token_store
from tests.conftest import LogCapture
from tests.fake_clock import FakeAuth, FakeClock, Outcome, settle
from tests.gateway_helpers import settings_for, wait_until

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py

S: Settings = settings_for("http://127.0.0.1:9", renew_retry_min="1s", renew_retry_max="60s",
                           token_expiry_margin="10s", token_wait_timeout="4s",
                           auth_timeout="10s")


async def _slow_to_stop(gate: asyncio.Event) -> None:
    """A background task whose clean-up after a cancel waits for ``gate``."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await gate.wait()
        raise


def _events(cap: LogCapture, event: str) -> list[dict[str, Any]]:
    docs = [json.loads(line) for line in cap.lines if line.startswith("{")]
    return [d for d in docs if d.get("event") == event]


# -- §3: errors ---------------------------------------------------------------------------------
@pytest.mark.unit
async def test_lifecycle_rotation_crash_is_logged_once_with_its_traceback(
        log_capture: LogCapture) -> None:
    """A task of the manager that ends with an unforeseen exception (here a rotation whose
    auth client crashes) is logged once, with its traceback; the caller still gets it."""
    clock = FakeClock()
    auth = FakeAuth(clock)
    manager = TokenManager(auth, S.token_side(), clock)
    await manager.start()
    await clock.advance(1)
    rotation = FakeAuth(clock, [Outcome("crash")])
    switching = asyncio.create_task(manager.switch_credentials(S.partner, rotation))
    await clock.advance(1)
    with pytest.raises(ValueError, match="nobody foresaw"):
        await asyncio.wait_for(switching, 5)
    await settle()
    failed = _events(log_capture, "task_failed")
    assert len(failed) == 1, failed
    assert failed[0]["error"] == "ValueError"
    assert "Traceback" in failed[0].get("exc", ""), failed
    await manager.stop()


@pytest.mark.unit
async def test_lifecycle_a_failing_hook_never_turns_a_refresh_into_a_failure(
        log_capture: LogCapture) -> None:
    """The token file cannot be written after a successful refresh: the refresh still counts
    as a success, its new refresh token is not banned, and the next renewal refreshes with
    it. The hook's failure is logged with its traceback."""
    clock = FakeClock()
    auth = FakeAuth(clock, [Outcome(lifetime=100), Outcome(lifetime=100),
                            Outcome(lifetime=100)])
    writes: list[int] = []

    def persist(token: Token, partner: PartnerConfig) -> None:
        writes.append(token.generation)
        if token.generation == 2:
            raise OSError(28, "No space left on device")

    manager = TokenManager(auth, S.token_side(), clock, persist=persist, rng=random.Random(1))
    await manager.start()
    await clock.advance(95)  # past the first renewal (a refresh)
    st = manager.state
    assert st.token is not None and st.token.generation == 2
    assert manager.status().last_outcome == "refresh:ok"
    assert not st.refresh_banned and st.failures == 0
    await clock.advance(95)
    kinds = [(c.kind, c.refresh_sent) for c in auth.calls]
    assert kinds == [("login", None), ("refresh", "fake-refresh-1"),
                     ("refresh", "fake-refresh-2")], kinds
    hooks = _events(log_capture, "token_hook_failed")
    assert len(hooks) == 1 and "OSError" in json.dumps(hooks[0]), hooks
    await manager.stop()


@pytest.mark.unit
async def test_lifecycle_no_auth_call_starts_once_the_manager_is_stopping() -> None:
    """A request still waiting for a token after ``stop`` (a worker's late ask in the
    supervisor) gets a prompt 503, never a login on an auth session about to close (the soak
    found that login: "Session is closed"). A rotation asked then is refused too."""
    clock = FakeClock()
    auth = FakeAuth(clock, [Outcome(lifetime=100)])
    manager = TokenManager(auth, S.token_side(), clock)
    await manager.start()
    await clock.advance(1)
    assert manager.current is not None
    await manager.stop()
    await clock.advance(200)  # the token is past its usable life
    with pytest.raises(TokenUnavailable, match="stopping"):
        await asyncio.wait_for(manager.get(), 1)
    with pytest.raises(TokenUnavailable, match="stopping"):
        await asyncio.wait_for(manager.switch_credentials(S.partner, auth), 1)
    assert [c.kind for c in auth.calls] == ["login"]


@pytest.mark.unit
async def test_lifecycle_an_auth_call_failing_as_its_lease_is_lost_is_retrieved() -> None:
    """The auth call fails while the lease extension is under way, and the extension fails
    too: ``lease_lost`` is raised, and the call's own error is retrieved, never reported as
    "Task exception was never retrieved" (the 10-minute soak found that line)."""
    import gc

    from gateway.clock import SystemClock
    from gateway.errors import AuthError

    unretrieved: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(str(ctx.get("message"))))

    class LosingFleet:
        lease_ttl = 0.3

        async def extend(self) -> bool:
            await asyncio.sleep(0.08)  # the call fails meanwhile
            return False

    async def failing_call() -> Any:
        await asyncio.sleep(0.13)
        raise AuthError("timeout", "login sent, no answer", ambiguous=True)

    manager = TokenManager(FakeAuth(FakeClock()), S.token_side(), SystemClock())
    sync = FleetSync(LosingFleet(), manager, SystemClock(),  # type: ignore[arg-type]
                     S.token_side().policy())
    with pytest.raises(AuthError) as raised:
        await sync.leased(failing_call())
    assert raised.value.reason == "lease_lost"
    del raised
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert unretrieved == []


@pytest.mark.unit
async def test_lifecycle_cancel_and_wait_never_swallows_a_cancel_of_the_caller() -> None:
    """Cancelled while it waits for a slow-to-stop task, the caller is cancelled too (the
    old ``suppress(CancelledError)`` ran on as if nothing happened)."""
    went_on: list[str] = []

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # cleanup that takes a moment
            raise

    async def stopper() -> None:
        child = asyncio.create_task(slow_to_stop())
        await asyncio.sleep(0)
        await cancel_and_wait(child)
        went_on.append("after the stop")

    task = asyncio.create_task(stopper())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []
    # A task that absorbs the cancel and returns: the caller's own cancel is still raised.
    async def absorbing() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # swallowed: it returns normally

    async def stopper2() -> None:
        child = asyncio.create_task(absorbing())
        await asyncio.sleep(0)
        await cancel_and_wait(child)
        went_on.append("after the second stop")

    task = asyncio.create_task(stopper2())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []
    # Its own task's cancellation is absorbed, and a task's failure is raised.
    ok = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(ok)
    assert ok.cancelled()

    async def boom() -> None:
        raise KeyError("x")

    failing = asyncio.create_task(boom())
    await asyncio.sleep(0)
    with pytest.raises(KeyError):
        await cancel_and_wait(failing)


async def test_lifecycle_manager_stop_cancelled_is_cancelled(sandbox: Sandbox) -> None:
    """``TokenManager.stop`` cancelled mid-way raises CancelledError to its caller."""
    async with GatewayServer(settings_for(sandbox)) as gw:
        manager = gw.state.manager
        gate = asyncio.Event()
        manager._fleet_task = asyncio.create_task(_slow_to_stop(gate))
        stopping = asyncio.create_task(manager.stop())
        await asyncio.sleep(0.05)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        gate.set()


async def test_lifecycle_a_start_that_fails_after_binding_is_rolled_back(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, log_capture: LogCapture) -> None:
    """The admin app cannot be built (the last step of a start): the error propagates, both
    ports are free again, the auth session is closed and no task of the gateway runs on."""
    port, admin = _free_port(), _free_port()

    def broken(state: Any) -> Any:
        raise RuntimeError("admin app cannot be built")

    monkeypatch.setattr(app_module, "build_admin_app", broken)
    before = asyncio.all_tasks()
    gw = GatewayServer(settings_for(sandbox, listen=f"127.0.0.1:{port}",
                                    admin_listen=f"127.0.0.1:{admin}"))
    with pytest.raises(RuntimeError, match="admin app"):
        await gw.start()
    await settle()
    for p in (port, admin):  # free again: bind it ourselves
        with socket.create_server(("127.0.0.1", p)):
            pass
    assert gw._auth_session.closed
    left = [t for t in asyncio.all_tasks() - before if not t.done()
            and t is not asyncio.current_task()]
    assert left == [], left
    # And the same settings start normally afterwards.
    monkeypatch.undo()
    async with GatewayServer(settings_for(sandbox, listen=f"127.0.0.1:{port}",
                                          admin_listen=f"127.0.0.1:{admin}")) as again:
        await wait_until(again.state.tokens.ready)


async def test_lifecycle_a_cancelled_start_or_body_leaves_nothing_running(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start cancelled part-way (here while the admin app is set up), and a running
    gateway whose ``async with`` body is cancelled: the clean-up runs to its end (a cancel
    already being handled is not raised again by each step), so no task of the gateway runs
    on and its auth session is closed."""
    from gateway.admin import build_admin_app as real

    def cancelling(state: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # delivered at the start's next await
        return real(state)

    before = asyncio.all_tasks()
    monkeypatch.setattr(app_module, "build_admin_app", cancelling)
    gw = GatewayServer(settings_for(sandbox))
    starting = asyncio.create_task(gw.start())
    with pytest.raises(asyncio.CancelledError):
        await starting
    await settle()
    assert gw._auth_session.closed
    assert [t for t in asyncio.all_tasks() - before if not t.done()
            and t is not asyncio.current_task()] == []
    monkeypatch.undo()

    started = asyncio.Event()
    holder: list[GatewayServer] = []

    async def body() -> None:
        async with GatewayServer(settings_for(sandbox)) as running:
            holder.append(running)
            await wait_until(running.state.tokens.ready)
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert holder[0]._auth_session.closed
    assert [t for t in asyncio.all_tasks() - before if not t.done()
            and t is not asyncio.current_task()] == []


async def test_lifecycle_reloader_stop_cancelled_is_cancelled(sandbox: Sandbox) -> None:
    """``CredentialReloader.stop`` cancelled while a loop of it is slow to stop raises
    CancelledError to its caller (it used to swallow it and run on)."""
    async with GatewayServer(settings_for(sandbox)) as gw:
        reloader = gw.reloader
        assert reloader is not None
        gate = asyncio.Event()
        went_on: list[bool] = []
        extra = asyncio.create_task(_slow_to_stop(gate))
        reloader._tasks.append(extra)

        async def stopper() -> None:
            await reloader.stop()
            went_on.append(True)

        stopping = asyncio.create_task(stopper())
        await asyncio.sleep(0.05)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        gate.set()
        await asyncio.gather(extra, return_exceptions=True)
        assert went_on == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_lifecycle_a_crashing_probe_is_logged_and_serve_goes_on(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, log_capture: LogCapture) -> None:
    """The probe fails with an unforeseen error: it is logged at once, with its traceback
    (never "exception was never retrieved" at some later collection), counted as a probe
    that said nothing (readiness stays as it was), and ``serve`` keeps serving, then stops
    cleanly."""

    async def crashing_probe(self: AuthClient, token: Token) -> ProbeResult:
        raise RuntimeError("probe bug")

    monkeypatch.setattr(AuthClient, "probe", crashing_probe)
    serving = asyncio.create_task(serve(settings_for(
        sandbox, check_path="/bookings/000000000000000000000000")))
    await wait_until(lambda: _events(log_capture, "probe_crashed") != [], within=10)
    crashed = _events(log_capture, "probe_crashed")
    assert "RuntimeError" in crashed[0]["exc"] and crashed[0]["level"] == "error"
    assert _events(log_capture, "probe_inconclusive") != []
    assert not serving.done()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 20) == 0


# -- §4: one clock --------------------------------------------------------------------------
async def test_lifecycle_retry_back_off_sleeps_on_the_injected_clock() -> None:
    """A refused connection is retried after the back-off, slept on the gateway's clock with
    the gateway's random source: with a fake clock, no retry happens until it advances."""
    clock = FakeClock()
    s = settings_for("http://127.0.0.1:9", retry_backoff_min="2s", retry_backoff_max="2s",
                     retry_attempts="2")
    refused = _free_port()  # nothing listens there
    upstream = build_upstream(s, clock, Metrics(), random.Random(3))
    attempts = Attempts("GET", True, None, lambda: False, lambda resp, took: None,
                        lambda: None, lambda error: None)
    from multidict import CIMultiDict
    from yarl import URL
    sending = asyncio.create_task(upstream.retry.send(
        URL(f"http://127.0.0.1:{refused}/x"), CIMultiDict(), None, attempts))
    await wait_until(lambda: clock.sleeps != [], within=5)
    assert attempts.number == 1 and 1.0 <= clock.sleeps[0] <= 2.0, clock.sleeps
    await asyncio.sleep(0.2)  # real time passes: still waiting on the fake clock
    assert attempts.number == 1 and not sending.done()
    await clock.advance(2.0)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the second refusal stands
        await asyncio.wait_for(sending, 5)
    assert attempts.number == 2
    await upstream.close()


@pytest.mark.unit
async def test_lifecycle_fleet_waits_and_jitter_use_the_injected_sources() -> None:
    """The fleet's jitter share comes from the injected random source, and its wait for a
    change ends on the fake clock's time (or on a change), not on the loop's."""
    clock = FakeClock()
    store = token_store(settings_for("http://127.0.0.1:9", redis_url="redis://127.0.0.1:9/0"),
                      timeout=0.5)
    fleet = Fleet(store, lease_ttl=2.0, down_policy="fail", clock=clock,
                  rng=random.Random(42))
    assert fleet.u == random.Random(42).random()
    waiting = asyncio.create_task(fleet.wait_for_change(fleet.seq, 5.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await clock.advance(5.0)
    await asyncio.wait_for(waiting, 1)
    event = asyncio.Event()
    sleeping = asyncio.create_task(sleep_or_set(clock, event, 60))
    await settle()
    event.set()
    await asyncio.wait_for(sleeping, 1)
    await store.close()


async def test_lifecycle_credential_polling_runs_on_the_injected_clock(
        sandbox: Sandbox, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """GATEWAY_SECRETS_POLL_INTERVAL is counted on the gateway's clock: a changed file is not
    read while only real time passes, and is applied once the fake clock reaches it."""
    clock = FakeClock()
    key = tmp_path / "partner-id"
    key.write_text(sandbox.state.config.partner_id)
    env = {"REPAIRY_PARTNER_ID_FILE": str(key)}
    s = settings_for(sandbox, env=env, secrets_poll_interval="30s")
    reads: list[int] = []

    def load() -> Settings:
        reads.append(1)
        return settings_for(sandbox, env=env, secrets_poll_interval="30s")

    async with GatewayServer(s, clock=clock, reload_settings=load) as gw:
        await wait_until(gw.state.tokens.ready)
        key.write_text(sandbox.state.config.partner_id + "\n")  # changed bytes, same value
        await asyncio.sleep(0.3)
        assert reads == []
        await clock.advance(30.0)
        await wait_until(lambda: reads != [], within=5)
        assert len(reads) == 1
