"""Sandbox configuration, its typed application state, and the JSON helpers every sandbox
handler uses (the ``{"success": ..., "data" | "error": ...}`` envelope)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.sandbox.control import ControlState
from gateway.sandbox.data import ApiError, SandboxData
from gateway.sandbox.tokens import Credential, TokenStore

DEFAULT_APP_KEY = "sandbox-app-key"
DEFAULT_APP_SECRET = "sandbox-app-secret"
DEFAULT_PARTNER_ID = "sandbox-partner"
ACCESS_TTL = 48 * 3600.0
REFRESH_TTL = 14 * 86400.0


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Lifetimes are seconds (fractions allowed for tests)."""

    app_key: str = DEFAULT_APP_KEY
    app_secret: str = field(default=DEFAULT_APP_SECRET, repr=False)
    partner_id: str = DEFAULT_PARTNER_ID
    access_ttl: float = ACCESS_TTL
    refresh_ttl: float = REFRESH_TTL
    rotate_refresh: bool = True
    single_token: bool = False
    request_log_size: int = 1000
    #: Further partners, each with its own credentials and bookings (the first is the one
    #: above): ``--partners N`` on the command line adds ``sandbox-app-key-2``... .
    more_partners: tuple[Credential, ...] = ()

    def partners(self) -> list[Credential]:
        """Every partner this sandbox accepts, the first one first."""
        return [Credential(self.app_key, self.app_secret, self.partner_id), *self.more_partners]


def numbered_partner(n: int) -> Credential:
    """The made-up credentials of partner ``n`` (2, 3, ...) of a sandbox with several."""
    return Credential(f"{DEFAULT_APP_KEY}-{n}", f"{DEFAULT_APP_SECRET}-{n}",
                      f"{DEFAULT_PARTNER_ID}-{n}")


@dataclass
class SandboxState:
    config: SandboxConfig
    tokens: TokenStore
    data: SandboxData
    control: ControlState
    clock: Callable[[], float] = time.monotonic


STATE = web.AppKey("sandbox_state", SandboxState)
PARTNER = web.RequestKey("partner_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"success": True, "data": data}, status=status)


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": False, "error": {"code": code, "message": message,
                                                          **extra}}, status=status)


def bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def json_body(request: web.Request) -> Any:
    """Read a JSON body (or a form, for the auth calls); malformed → 400."""
    raw = await request.read()
    if request.content_type == "application/x-www-form-urlencoded":
        return dict((await request.post()).items())
    if not raw:
        raise ApiError(400, "invalid_body", "a JSON body is required")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from exc
