"""The GET cache never crosses callers (issue 20, part 4): RFC 9111's rules for a shared
cache, over real sockets against the sandbox. Each test here failed on 1ca7d9a."""

from __future__ import annotations

import email.utils
import time

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.proxy.cache import PARTNER_VALUE, answer_lifetime, cache_key
from gateway.sandbox import Sandbox
from tests.fleet_helpers import RedisServer
from tests.gateway_helpers import SERVICES, wait_until
from tests.sandbox_helpers import faults
from tests.test_proxy_cache import api_count, cache_gateway, redis_values

CATEGORY = "integration"  # unit, integration or system: tests/conftest.py


async def cached_how(http: aiohttp.ClientSession, url: str,
                     headers: list[tuple[str, str]] | None = None) -> tuple[str, bytes]:
    async with http.get(url + SERVICES, headers=CIMultiDict(headers or [])) as resp:
        assert resp.status == 200
        return resp.headers["X-Cache"], await resp.read()


async def answers_with(http: aiohttp.ClientSession, sb: Sandbox, **headers: str) -> None:
    await http.delete(f"{sb.url}/__sandbox/faults")
    await faults(http, sb, {"headers": headers, "scope": "api", "duration": 60})


async def test_an_answer_with_set_cookie_is_never_kept(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        await answers_with(http, sandbox, **{"Set-Cookie": "session=caller-one"})
        before = await api_count(http, sandbox)
        assert [(await cached_how(http, gw.url))[0] for _ in range(3)] == ["MISS"] * 3
        assert await api_count(http, sandbox) - before == 3
        assert len(gw.state.cache) == 0
    finally:
        await gw.stop()


async def test_vary_is_judged_on_what_was_sent_upstream(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """GATEWAY_FORWARDED_HEADERS=true sends each caller's own address upstream: an answer
    that varies on X-Forwarded-For is never served to a caller from another address (both
    callers send no such header themselves)."""
    gw = await cache_gateway(sandbox, forwarded_headers="true")
    other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    try:
        await answers_with(http, sandbox, Vary="X-Forwarded-For")
        assert (await cached_how(http, gw.url))[0] == "MISS"
        assert (await cached_how(http, gw.url))[0] == "HIT"
        assert (await cached_how(other, gw.url))[0] == "MISS"
        assert (await cached_how(other, gw.url))[0] == "HIT"
        # A caller cannot pick another's variant by sending the header: the gateway's wins.
        spoof = [("X-Forwarded-For", "127.0.0.1")]
        assert (await cached_how(other, gw.url, spoof))[0] == "HIT"
        async with http.get(f"{sandbox.url}/__sandbox/requests?limit=1") as resp:
            (entry,) = (await resp.json())["requests"]
        assert dict(entry["headers"])["X-Forwarded-For"] == "127.0.0.2"
    finally:
        await other.close()
        await gw.stop()


async def test_vary_compares_every_line_of_a_repeated_header(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        await answers_with(http, sandbox, Vary="Accept-Language")
        two_lines = [("Accept-Language", "en"), ("Accept-Language", "fr")]
        assert (await cached_how(http, gw.url, two_lines))[0] == "MISS"
        assert (await cached_how(http, gw.url, two_lines))[0] == "HIT"
        assert (await cached_how(http, gw.url, [("Accept-Language", "en")]))[0] == "MISS"
        assert (await cached_how(http, gw.url, [("Accept-Language", "en")]))[0] == "HIT"
        assert (await cached_how(http, gw.url, two_lines))[0] == "MISS"  # one variant a key
    finally:
        await gw.stop()


def http_date(at: float) -> str:
    return email.utils.formatdate(at, usegmt=True)


@pytest.mark.parametrize(("headers", "kept"), [
    ({"Pragma": "no-cache"}, False),
    ({"Expires": "0"}, False),  # invalid: already expired
    ({"Expires": "Thu, 01 Jan 1970 00:00:00 GMT"}, False),
    ({"Expires": "Thu, 01 Jan 1970 00:00:00 GMT", "Cache-Control": "max-age=30"}, True),
    ({"Pragma": "no-cache", "Cache-Control": "max-age=30"}, True),
])
async def test_pragma_and_expires_are_honoured(
        sandbox: Sandbox, http: aiohttp.ClientSession, headers: dict[str, str],
        kept: bool) -> None:
    """``Pragma: no-cache`` without Cache-Control, and a past or invalid ``Expires`` without
    max-age, keep the answer out; max-age wins over both (RFC 9111 §5.3, §5.4)."""
    gw = await cache_gateway(sandbox)
    try:
        await answers_with(http, sandbox, **headers)
        await cached_how(http, gw.url)
        assert (await cached_how(http, gw.url))[0] == ("HIT" if kept else "MISS")
    finally:
        await gw.stop()


async def test_a_future_expires_caps_the_lifetime(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        await answers_with(http, sandbox, Expires=http_date(time.time() + 2))
        assert (await cached_how(http, gw.url))[0] == "MISS"
        assert (await cached_how(http, gw.url))[0] == "HIT"

        async def expired() -> bool:
            return (await cached_how(http, gw.url))[0] == "MISS"

        await wait_until(expired, within=6, interval=0.2)
    finally:
        await gw.stop()


@pytest.mark.unit
def test_lifetime_rules() -> None:
    """The arithmetic of RFC 9111 §4.2.1 and §4.2.3 on header sets, at a fixed clock."""
    now = 1_800_000_000.0

    def life(**h: str) -> float | None:
        return answer_lifetime(CIMultiDict(h), 60.0, now)

    assert life() == 60.0
    assert life(**{"Cache-Control": "s-maxage=10, max-age=40"}) == 10.0
    assert life(**{"Cache-Control": "max-age=40", "Age": "15"}) == 25.0
    assert life(**{"Cache-Control": "max-age=40", "Age": "99"}) is None
    assert life(Expires=http_date(now + 30), Date=http_date(now - 10)) == 40.0
    assert life(Expires=http_date(now + 30)) == 30.0
    assert life(Expires="garbage") is None
    assert life(**{"Cache-Control": 'no-cache="Set-Cookie"'}) is None
    assert life(**{"Cache-Control": "public, max-age=5"}) == 5.0
    assert life(**{"Set-Cookie": "a=b", "Cache-Control": "public"}) is None


async def test_vary_on_our_credentials_keys_on_the_partner_never_the_token(
        sandbox: Sandbox, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    """``Vary: Authorization, X-Partner-ID``: the answer is kept for the partner (it survives
    a token renewal) and no field in memory or in Redis holds the token."""
    gw = await cache_gateway(sandbox, redis_url=redis_server.url, cache_shared="true")
    try:
        await answers_with(http, sandbox, Vary="Authorization, X-Partner-ID")
        assert (await cached_how(http, gw.url))[0] == "MISS"
        assert (await cached_how(http, gw.url))[0] == "HIT"
        tokens = gw.state.tokens
        first = tokens.current
        assert first is not None
        entry = gw.state.cache.lookup(cache_key(gw.settings.partner.partner_id, SERVICES),
                                      CIMultiDict())
        assert entry is not None and entry.vary_values == (PARTNER_VALUE, PARTNER_VALUE)
        assert first.access not in repr(entry)

        async def written() -> bool:
            return len(await redis_values(redis_server, "*:cache:*")) == 1

        await wait_until(written)
        (value,) = await redis_values(redis_server, "*:cache:*")
        assert first.access not in value and value.startswith("plain:")
        tokens.invalidate(first.generation, "test")
        assert (await tokens.get(newer_than=first.generation)).access != first.access
        assert (await cached_how(http, gw.url))[0] == "HIT"
    finally:
        await gw.stop()


async def test_a_caller_asking_no_store_is_neither_answered_from_nor_stored(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    gw = await cache_gateway(sandbox)
    try:
        assert (await cached_how(http, gw.url, [("Cache-Control", "no-store")]))[0] == "MISS"
        assert (await cached_how(http, gw.url))[0] == "MISS"
        assert (await cached_how(http, gw.url, [("Cache-Control", "no-store")]))[0] == "MISS"
        assert (await cached_how(http, gw.url))[0] == "HIT"
    finally:
        await gw.stop()


async def test_vary_values_are_kept_as_digests_never_as_sent(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    """``Vary: Cookie``: the entry is keyed on the caller's cookie, which is not stored."""
    gw = await cache_gateway(sandbox)
    try:
        await answers_with(http, sandbox, Vary="Cookie")
        mine = [("Cookie", "session=caller-one-secret")]
        assert (await cached_how(http, gw.url, mine))[0] == "MISS"
        assert (await cached_how(http, gw.url, mine))[0] == "HIT"
        assert (await cached_how(http, gw.url, [("Cookie", "session=other")]))[0] == "MISS"
        entry = gw.state.cache.lookup(cache_key(gw.settings.partner.partner_id, SERVICES),
                                      CIMultiDict([("Cookie", "session=other")]))
        assert entry is not None and "session=other" not in repr(entry.vary_values)
    finally:
        await gw.stop()
