"""Several credential profiles in one gateway, against a sandbox with three partners (one live
token per credential): the choice per request, isolation of tokens, bookings, Idempotency-Key
records and cached answers, one profile's refusal, readiness, /tokenz and the metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import GatewayServer
from gateway.sandbox import Sandbox, SandboxConfig
from gateway.sandbox.state import numbered_partner
from gateway.sandbox.tokens import Credential
from tests.conftest import LogCapture
from tests.gateway_helpers import get_json, settings_for, wait_until
from tests.sandbox_helpers import faults

CATEGORY = "integration"

WORKSHOP = "5f1a2b3c4d5e6f7a8b9c0d01"
BOOKING = {"workshopId": WORKSHOP, "startTime": "2030-01-02T09:00:00+00:00",
           "serviceType": "Logbook service",
           "customer": {"firstName": "Ana", "phone": "+61400000000", "email": "a@example.com"},
           "car": {"rego": "ABC123"}}
HEADER = "X-Repairy-Credential"


def profiles_env(sb: Sandbox, names: tuple[str, ...] = ("eu", "au"),
                 **extra: str) -> dict[str, str]:
    """Profiles ``names`` as partners 2, 3... of ``sb``."""
    env = {"GATEWAY_PROFILES": ",".join(names)}
    for n, name in enumerate(names, start=2):
        env |= profile_vars(name, numbered_partner(n))
    return env | extra


def profile_vars(name: str, cred: Credential) -> dict[str, str]:
    """Profile ``name``'s credential variables."""
    up = name.upper()
    return {f"REPAIRY_PROFILE_{up}_APP_KEY": cred.app_key,
            f"REPAIRY_PROFILE_{up}_APP_SECRET": cred.app_secret,
            f"REPAIRY_PROFILE_{up}_PARTNER_ID": cred.partner_id}


@pytest.fixture
async def three() -> AsyncIterator[Sandbox]:
    config = SandboxConfig(single_token=True,
                           more_partners=(numbered_partner(2), numbered_partner(3)))
    async with Sandbox(config) as sb:
        yield sb


def sent_headers(echoed: Any) -> dict[str, str]:
    """The headers the sandbox's echo endpoint received."""
    return {k.lower(): v for k, v in echoed["data"]["headers"].items()}


async def _all_ready(gw: GatewayServer) -> bool:
    return all(held.manager.ready() for held in gw.state.profiles.values())


async def test_each_profile_has_its_own_token_and_partner(
        three: Sandbox, http: aiohttp.ClientSession) -> None:
    s = settings_for(three, profiles_env(three))
    async with GatewayServer(s) as gw:
        await wait_until(lambda: _all_ready(gw))
        seen = {}
        for name in (None, "default", "eu", "au"):
            headers = {HEADER: name} if name else {}
            async with http.get(f"{gw.url}/__sandbox/echo", headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                echoed = await resp.json()
            sent = sent_headers(echoed)
            assert HEADER.lower() not in sent  # stripped before forwarding
            seen[name] = sent["x-partner-id"]
        assert seen == {None: "sandbox-partner", "default": "sandbox-partner",
                        "eu": "sandbox-partner-2", "au": "sandbox-partner-3"}
        stats = three.state.control.stats()
        assert {p: c["logins"] for p, c in stats["partners"].items()} == {
            "sandbox-partner": 1, "sandbox-partner-2": 1, "sandbox-partner-3": 1}
        assert all(c["wrong_partner_calls"] == 0 for c in stats["partners"].values())
        assert three.state.tokens.live_access_tokens == 3  # one live token each
        # An unknown profile, without client keys: 400, and nothing went upstream.
        before = stats["api_requests"]
        async with http.get(f"{gw.url}/__sandbox/echo", headers={HEADER: "mars"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "unknown_credential"
        assert three.state.control.stats()["api_requests"] == before
        # /tokenz lists every profile; the metrics carry the credential label.
        _, tokenz = await get_json(http, gw.admin_url + "/tokenz")
        assert set(tokenz["profiles"]) == {"default", "eu", "au"}
        assert tokenz["profiles"]["eu"]["credential"]["partner_id"] == "sandbox-partner-2"
        assert "sbx_" not in json.dumps(tokenz)
        text = gw.metrics.render().decode()
        for name in ("default", "eu", "au"):
            assert (f'repairy_gateway_token_renewals_total{{credential="{name}",kind="login",'
                    'outcome="success",reason="ok"} 1.0') in text, name


async def test_client_keys_name_the_profiles_they_may_use(
        three: Sandbox, http: aiohttp.ClientSession) -> None:
    keys = "billing=client-key-billing-0123456789,web=client-key-web-0123456789"
    s = settings_for(three, profiles_env(three, GATEWAY_CLIENT_KEYS=keys,
                                         GATEWAY_CLIENT_PROFILES="billing=eu|au"),
                     listen="127.0.0.1:0")
    async with GatewayServer(s) as gw:
        await wait_until(lambda: _all_ready(gw))

        async def partner(client: str, name: str | None) -> tuple[int, Any]:
            headers = {"X-Gateway-Key": f"client-key-{client}-0123456789"}
            if name:
                headers[HEADER] = name
            async with http.get(f"{gw.url}/__sandbox/echo", headers=headers) as resp:
                body = await resp.json()
            if resp.status != 200:
                return resp.status, body["error"]["code"]
            sent = sent_headers(body)
            return 200, sent["x-partner-id"]

        assert await partner("billing", None) == (200, "sandbox-partner-2")  # its default
        assert await partner("billing", "au") == (200, "sandbox-partner-3")
        assert await partner("web", None) == (200, "sandbox-partner")
        refused = (403, "credential_not_allowed")
        assert await partner("billing", "default") == refused
        assert await partner("web", "eu") == refused
        assert await partner("web", "mars") == refused  # unknown: the same answer


async def test_same_idempotency_key_under_two_profiles_makes_two_bookings(
        three: Sandbox, http: aiohttp.ClientSession) -> None:
    s = settings_for(three, profiles_env(three))
    async with GatewayServer(s) as gw:
        await wait_until(lambda: _all_ready(gw))
        ids: dict[str, str] = {}
        for name in ("default", "eu", "default", "eu"):
            async with http.post(f"{gw.url}/bookings", json=BOOKING, headers={
                    HEADER: name, "Idempotency-Key": "same-key-1"}) as resp:
                assert resp.status in (200, 201), await resp.text()
                booking = (await resp.json())["data"]["id"]
            assert ids.setdefault(name, booking) == booking  # the repeat: the kept answer
        assert ids["default"] != ids["eu"]
        owners = {b["id"]: b["partnerId"] for b in three.state.data.bookings.values()}
        assert owners == {ids["default"]: "sandbox-partner", ids["eu"]: "sandbox-partner-2"}


async def test_a_cached_get_never_crosses_profiles(
        three: Sandbox, http: aiohttp.ClientSession) -> None:
    s = settings_for(three, profiles_env(three, GATEWAY_CACHE_ROUTES="GET /bookings/*=60s"))
    async with GatewayServer(s) as gw:
        await wait_until(lambda: _all_ready(gw))
        async with http.post(f"{gw.url}/bookings", json=BOOKING) as resp:
            booking = (await resp.json())["data"]["id"]
        for _ in range(2):  # the second from the cache
            async with http.get(f"{gw.url}/bookings/{booking}") as resp:
                assert resp.status == 200
        assert resp.headers["X-Cache"] == "HIT"
        # The same path under another profile: its own call, which its partner cannot see.
        async with http.get(f"{gw.url}/bookings/{booking}", headers={HEADER: "eu"}) as resp:
            assert resp.status == 404, await resp.text()
            assert resp.headers.get("X-Cache") == "MISS"


@pytest.mark.parametrize("required", [False, True])
async def test_one_profile_refused_others_serve_and_readiness_follows_required(
        three: Sandbox, http: aiohttp.ClientSession, required: bool,
        log_capture: LogCapture) -> None:
    env = profiles_env(three, REPAIRY_PROFILE_AU_APP_SECRET="wrong-secret",
                       REPAIRY_PROFILE_AU_REQUIRED=str(required).lower())
    async with GatewayServer(settings_for(three, env)) as gw:
        au = gw.state.profiles["au"].manager
        await wait_until(lambda: au.status().credentials_rejected)
        await wait_until(lambda: gw.state.profiles["eu"].manager.ready())
        async with http.get(f"{gw.url}/__sandbox/echo", headers={HEADER: "au"}) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "credentials_rejected"
        for name in ("default", "eu"):
            async with http.get(f"{gw.url}/__sandbox/echo", headers={HEADER: name}) as resp:
                assert resp.status == 200
        status, body = await get_json(http, gw.admin_url + "/readyz")
        assert body["profiles"]["au"] == {
            "ready": False, "required": required, "codes": ["no_usable_token"],
            "reasons": ["no usable token: Repairy rejected the credentials"]}
        assert body["profiles"]["eu"]["ready"] is True
        if required:
            assert status == 503 and body["codes"] == ["no_usable_token"]
            assert body["reasons"] == ["profile au: no usable token: Repairy rejected the "
                                       "credentials"]
        else:
            assert status == 200 and "optional profile au" in body["notes"][0]
        text = gw.metrics.render().decode()
        assert 'repairy_gateway_credential_ready{credential="au"} 0.0' in text
        assert 'repairy_gateway_credential_ready{credential="eu"} 1.0' in text
        assert f"repairy_gateway_ready {1.0 if not required else 0.0}" in text
    # Its log lines say which profile (its background work logs under its name; so does
    # each request of a gateway with several profiles).
    failed = [json.loads(line) for line in log_capture.lines if line.startswith("{")
              and '"token login failed"' in line]
    assert failed and {doc["credential"] for doc in failed} == {"au"}
    answered = [json.loads(line) for line in log_capture.lines if line.startswith("{")
                and '"event": "request"' in line]
    assert {doc["credential"] for doc in answered} == {"default", "eu", "au"}


async def test_revoking_one_profile_relogs_that_profile_only(
        three: Sandbox, http: aiohttp.ClientSession) -> None:
    async with GatewayServer(settings_for(three, profiles_env(three))) as gw:
        await wait_until(lambda: _all_ready(gw))
        await faults(http, three, {"revoke_tokens": "sandbox-partner-2"})
        for _ in range(3):
            for name in ("default", "eu", "au"):
                async with http.get(f"{gw.url}/__sandbox/echo",
                                    headers={HEADER: name}) as resp:
                    assert resp.status == 200, (name, await resp.text())
        logins = {p: c["logins"] for p, c in three.state.control.stats()["partners"].items()}
        assert logins == {"sandbox-partner": 1, "sandbox-partner-2": 2, "sandbox-partner-3": 1}


async def test_rotating_one_profiles_secret_files_switches_that_profile_only(
        three: Sandbox, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A profile's *_FILE credentials change (Kubernetes updated its Secret): that profile
    logs in with them and switches; the other profiles keep their tokens, no login."""
    from tests.test_rotation import SecretMount

    eu = numbered_partner(2)
    mount = SecretMount(tmp_path, {"app-key": eu.app_key, "app-secret": eu.app_secret,
                                   "partner-id": eu.partner_id})
    env = profiles_env(three, ("eu",))
    for field in ("app-key", "app-secret", "partner-id"):
        var = f"REPAIRY_PROFILE_EU_{field.upper().replace('-', '_')}"
        del env[var]
        env[var + "_FILE"] = str(tmp_path / field)

    def load() -> Any:
        return settings_for(three, env, secrets_poll_interval="0.1s")

    async with GatewayServer(load(), reload_settings=load) as gw:
        await wait_until(lambda: _all_ready(gw))
        default_token = gw.state.profiles["default"].manager.current
        async with http.post(f"{three.url}/__sandbox/credentials", json={"replace": {
                "app_key": "eu-key-2", "app_secret": "eu-secret-2",
                "partner_id": eu.partner_id}}) as resp:
            assert resp.status == 200
        mount.update({"app-key": "eu-key-2", "app-secret": "eu-secret-2",
                      "partner-id": eu.partner_id})
        eu_manager = gw.state.profiles["eu"].manager
        await wait_until(lambda: eu_manager.current is not None
                         and eu_manager.current.generation == 2, within=5)
        assert gw.state.profiles["default"].manager.current is default_token
        async with http.get(f"{gw.url}/__sandbox/echo", headers={HEADER: "eu"}) as resp:
            assert resp.status == 200
        logins = {p: c["logins"] for p, c in three.state.control.stats()["partners"].items()}
        assert logins == {"sandbox-partner": 1, "sandbox-partner-2": 2}
        assert gw.state.settings.profiles[1].partner.app_key.reveal() == "eu-key-2"


async def test_two_profiles_of_one_partner_keep_their_keys_apart(
        http: aiohttp.ClientSession) -> None:
    """Two profiles with the same Partner ID (another App Key): still two bookings for one
    Idempotency-Key, and a GET cached under one is fetched afresh under the other."""
    alt = Credential("sandbox-app-key-alt", "sandbox-app-secret-alt", "sandbox-partner")
    async with Sandbox(SandboxConfig(more_partners=(alt,))) as sb:
        env = {"GATEWAY_PROFILES": "alt", "REPAIRY_PROFILE_ALT_APP_KEY": alt.app_key,
               "REPAIRY_PROFILE_ALT_APP_SECRET": alt.app_secret,
               "REPAIRY_PROFILE_ALT_PARTNER_ID": alt.partner_id,
               "GATEWAY_CACHE_ROUTES": "GET /bookings/*=60s"}
        async with GatewayServer(settings_for(sb, env)) as gw:
            await wait_until(lambda: _all_ready(gw))
            ids = []
            for name in ("default", "alt"):
                async with http.post(f"{gw.url}/bookings", json=BOOKING, headers={
                        HEADER: name, "Idempotency-Key": "shared-partner-key"}) as resp:
                    assert resp.status == 201, await resp.text()
                    ids.append((await resp.json())["data"]["id"])
            assert ids[0] != ids[1] and len(sb.state.data.bookings) == 2
            caches = []
            for name in ("default", "default", "alt"):
                async with http.get(f"{gw.url}/bookings/{ids[0]}",
                                    headers={HEADER: name}) as resp:
                    assert resp.status == 200
                    caches.append(resp.headers.get("X-Cache"))
            assert caches == ["MISS", "HIT", "MISS"]


async def test_a_busy_profile_leaves_the_others_their_connections_and_breaker(
        three: Sandbox, http: aiohttp.ClientSession) -> None:
    """One profile's upstream slots full (its calls held at the sandbox): the others still
    get connections at once, their breaker stays closed; the busy one answers 503
    upstream_busy beyond its slots."""
    env = profiles_env(three, GATEWAY_POOL_SIZE="2", GATEWAY_CONNECT_TIMEOUT="0.5s")
    async with GatewayServer(settings_for(three, env)) as gw:
        await wait_until(lambda: _all_ready(gw))
        await faults(http, three, {"hold": "eu-gate", "partner": "sandbox-partner-2",
                                   "scope": "api", "persistent": True})

        async def call(name: str) -> tuple[int, str | None]:
            async with http.get(f"{gw.url}/__sandbox/echo", headers={HEADER: name}) as resp:
                body = await resp.json()
                return resp.status, body.get("error", {}).get("code")

        held = [asyncio.create_task(call("eu")) for _ in range(2)]
        await wait_until(lambda: three.state.control.holding["eu-gate"] == 2)
        assert await asyncio.wait_for(call("eu"), 5) == (503, "upstream_busy")
        others = await asyncio.wait_for(asyncio.gather(
            *(call(name) for name in ("default", "au", "default", "au", "default"))), 5)
        assert others == [(200, None)] * 5
        assert three.state.control.holding["eu-gate"] == 2  # still held meanwhile
        async with http.post(f"{three.url}/__sandbox/gates/eu-gate"):
            pass
        assert [await task for task in held] == [(200, None)] * 2
        text = gw.metrics.render().decode()
        for name in ("default", "eu", "au"):
            assert f'repairy_gateway_circuit_breaker_state{{credential="{name}"}} 0.0' in text


async def test_each_profile_keeps_its_token_in_its_own_file(
        three: Sandbox, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Token files per profile: a restart reuses every profile's own token (no login), and
    each file holds its own partner's."""
    env = profiles_env(three, ("eu",), REPAIRY_PROFILE_EU_TOKEN_FILE=str(tmp_path / "eu.json"))
    s = settings_for(three, env, token_file=str(tmp_path / "default.json"))
    for _ in range(2):
        async with GatewayServer(s) as gw:
            await wait_until(lambda: _all_ready(gw))
            for name in ("default", "eu"):
                async with http.get(f"{gw.url}/__sandbox/echo",
                                    headers={HEADER: name}) as resp:
                    assert resp.status == 200
    logins = {p: c["logins"] for p, c in three.state.control.stats()["partners"].items()}
    assert logins == {"sandbox-partner": 1, "sandbox-partner-2": 1}
    assert "sandbox-partner-2" in (tmp_path / "eu.json").read_text()
    assert "sandbox-partner-2" not in (tmp_path / "default.json").read_text()


async def test_rate_limit_and_persistent_401_are_each_profiles_own(
        three: Sandbox, http: aiohttp.ClientSession, log_capture: LogCapture) -> None:
    """GATEWAY_RATE_LIMIT holds per profile (one profile's burst spent, the others pass);
    a route that refuses one profile's brand-new token too is marked persistent 401 for that
    profile only."""
    env = profiles_env(three, GATEWAY_RATE_LIMIT="0.1", GATEWAY_RATE_LIMIT_BURST="3")
    async with GatewayServer(settings_for(three, env)) as gw:
        await wait_until(lambda: _all_ready(gw))
        await faults(http, three, {"status": 401, "path": "/bookings/*", "persistent": True,
                                   "partner": "sandbox-partner-2", "scope": "api"})
        statuses = []
        for name in ("eu", "eu", "eu", "eu", "default", "au"):
            async with http.get(f"{gw.url}/bookings/000000000000000000000000",
                                headers={HEADER: name}) as resp:
                statuses.append(resp.status)
        # eu: a 401 (the route refused its renewed token too), then two more, then its
        # burst of 3 is spent; default and au are each within their own.
        assert statuses == [401, 401, 401, 429, 404, 404]
        _, tokenz = await get_json(http, gw.admin_url + "/tokenz")
        marked = {name: body["persistent_401_routes"]
                  for name, body in tokenz["profiles"].items()}
        assert list(marked["eu"]) and not marked["default"] and not marked["au"]
    # What a request makes the token side log names the request's profile.
    invalidated = [json.loads(line) for line in log_capture.lines
                   if line.startswith("{") and '"token invalidated"' in line]
    assert invalidated and {doc.get("credential") for doc in invalidated} == {"eu"}
