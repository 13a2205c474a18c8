"""The token side's configs: who the partner is, how to call the auth endpoints, and the
renewal policy. Each field is a setting declared once (:mod:`gateway.declare`); for several
credentials, one :class:`PartnerConfig` each, with one Auth and Token config for all."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import ClassVar

from yarl import URL

from gateway.config_values import (
    bounded_int,
    bounded_number,
    choice,
    duration_at_least,
    parse_base_url,
    parse_bool,
    parse_duration,
    parse_fraction,
    parse_name,
    parse_optional_api_path,
    parse_optional_path,
    parse_path,
    parse_positive_duration,
    parse_renew_fraction,
    parse_secret,
)
from gateway.declare import setting
from gateway.redact import Secret
from gateway.token.renewal import RenewalPolicy


@dataclass(frozen=True)
class PartnerConfig:
    """Which Repairy, and as whom: the base URL and the partner credentials."""

    SECTION: ClassVar[str] = "partner"

    base_url: URL = setting(
        "REPAIRY_BASE_URL", parse_base_url, None,
        "Upstream base URL, may carry a path prefix (https://host/prefix).")
    app_key: Secret = setting(
        "REPAIRY_APP_KEY", parse_secret, None,
        "Partner App Key (or REPAIRY_APP_KEY_FILE).",
        file_variant=True, secret=True)
    app_secret: Secret = setting(
        "REPAIRY_APP_SECRET", parse_secret, None,
        "Partner App Secret (or REPAIRY_APP_SECRET_FILE).",
        file_variant=True, secret=True)
    partner_id: str = setting(
        "REPAIRY_PARTNER_ID", parse_name, None,
        "Partner ID sent as X-Partner-ID (or REPAIRY_PARTNER_ID_FILE).",
        file_variant=True)


@dataclass(frozen=True)
class AuthConfig:
    """How the auth endpoints are called, and what their grants may claim."""

    SECTION: ClassVar[str] = "auth"

    auth_token_path: str = setting(
        "REPAIRY_AUTH_TOKEN_PATH", parse_path, "/auth/token",
        "Login endpoint, relative to the base URL.")
    auth_refresh_path: str = setting(
        "REPAIRY_AUTH_REFRESH_PATH", parse_path, "/auth/refresh",
        "Refresh endpoint, relative to the base URL.")
    auth_app_key_field: str = setting(
        "REPAIRY_AUTH_APP_KEY_FIELD", parse_name, "appKey",
        "Login body field carrying the App Key.")
    auth_app_secret_field: str = setting(
        "REPAIRY_AUTH_APP_SECRET_FIELD", parse_name, "appSecret",
        "Login body field carrying the App Secret.")
    auth_refresh_token_field: str = setting(
        "REPAIRY_AUTH_REFRESH_TOKEN_FIELD", parse_name, "refreshToken",
        "Refresh body field carrying the refresh token.")
    auth_body_format: str = setting(
        "REPAIRY_AUTH_BODY_FORMAT", choice("json", "form"), "json",
        "Encoding of auth request bodies: json or form (urlencoded).")
    auth_refresh_bearer: bool = setting(
        "REPAIRY_AUTH_REFRESH_BEARER", parse_bool, "true",
        "Send the current access token as Bearer on refresh.")
    check_path: str = setting(
        "GATEWAY_CHECK_PATH", parse_optional_api_path, "/bookings/000000000000000000000000",
        "What 'check' and the running gateway GET to prove the token and the Partner ID "
        "work (2xx or 404 pass; 403 or a 401 that survives a renewal: not ready; off: no "
        "call).")
    reprobe_min_refusals: int = setting(
        "GATEWAY_REPROBE_MIN_REFUSALS", bounded_int(1, 1_000_000), "20",
        "Live traffic asks for a probe of GATEWAY_CHECK_PATH (at most one a minute) when a "
        "minute holds at least this many upstream 401/403 passed back to callers, and "
        "GATEWAY_REPROBE_REFUSED_RATIO of its upstream answers.")
    reprobe_refused_ratio: float = setting(
        "GATEWAY_REPROBE_REFUSED_RATIO", bounded_number(0.01, 1.0), "0.5",
        "The share of a minute's upstream answers that must be 401/403 (and at least "
        "GATEWAY_REPROBE_MIN_REFUSALS of them) before live traffic asks for a probe.")
    auth_timeout: float = setting(
        "GATEWAY_AUTH_TIMEOUT", duration_at_least(0.1), "10s",
        "Time allowed for one login or refresh call. At least 100ms.")
    access_token_default_ttl: float = setting(
        "REPAIRY_ACCESS_TOKEN_TTL", duration_at_least(1.0), "48h",
        "Access-token lifetime assumed when the auth response states none. At least 1s.")
    refresh_token_default_ttl: float = setting(
        "REPAIRY_REFRESH_TOKEN_TTL", duration_at_least(1.0), "14d",
        "Refresh-token lifetime assumed when the auth response states none. At least "
        "1s.")


@dataclass(frozen=True)
class TokenConfig:
    """When a token is renewed, used, waited for and kept."""

    SECTION: ClassVar[str] = "token"

    renew_at_fraction: float = setting(
        "GATEWAY_RENEW_AT_FRACTION", parse_renew_fraction, "0.8",
        "Renew in the background once this share of the token lifetime has passed.")
    renew_jitter_fraction: float = setting(
        "GATEWAY_RENEW_JITTER_FRACTION", parse_fraction, "0.1",
        "Renew up to this share of the lifetime earlier, at random, so replicas spread.")
    token_expiry_margin: float = setting(
        "GATEWAY_TOKEN_EXPIRY_MARGIN", parse_duration, "60s",
        "Stop using a token this long before it expires (capped at 10% of its lifetime).")
    token_wait_timeout: float = setting(
        "GATEWAY_TOKEN_WAIT_TIMEOUT", duration_at_least(0.1), "10s",
        "Longest a request waits for a token when none is usable (then 503). At least "
        "100ms.")
    renew_retry_min: float = setting(
        "GATEWAY_RENEW_RETRY_MIN", duration_at_least(0.05), "1s",
        "First back-off after a failed renewal (doubles each failure, jittered). At least "
        "50ms.")
    renew_retry_max: float = setting(
        "GATEWAY_RENEW_RETRY_MAX", duration_at_least(0.5), "60s",
        "Longest back-off between failed renewals. At least 500ms.")
    login_retry_interval: float = setting(
        "GATEWAY_LOGIN_RETRY_INTERVAL", duration_at_least(0.05), "30s",
        "Wait between logins while Repairy refuses the configuration (rejected "
        "credentials, a wrong auth path or body). At least 50ms.")
    persistent_401_cooldown: float = setting(
        "GATEWAY_PERSISTENT_401_COOLDOWN", duration_at_least(1.0), "60s",
        "A route that answers 401 to a brand-new token too is passed through, without "
        "renewing, for this long (doubling while it persists). At least 1s.")
    persistent_401_cooldown_max: float = setting(
        "GATEWAY_PERSISTENT_401_COOLDOWN_MAX", parse_positive_duration, "1h",
        "Longest persistent-401 cool-down of a route.")
    contention_invalidations: int = setting(
        "GATEWAY_CONTENTION_INVALIDATIONS", bounded_int(1, 1000), "3",
        "This many invalidations of the newest token that no fleet peer's renewal explains, "
        "within GATEWAY_CONTENTION_WINDOW, mean someone else logs in with our credentials "
        "(then at most one login per GATEWAY_LOGIN_RETRY_INTERVAL).")
    contention_window: float = setting(
        "GATEWAY_CONTENTION_WINDOW", duration_at_least(1.0), "10m",
        "The window of GATEWAY_CONTENTION_INVALIDATIONS; contention ends after a window "
        "without one. At least 1s.")
    token_file: str = setting(
        "GATEWAY_TOKEN_FILE", parse_optional_path, "",
        "Keep the token in this file (0600) so a restart reuses it (empty: memory only).")


@dataclass(frozen=True)
class TokenSide:
    """What one managed token needs: whose it is, how to get it, when to renew it. A gateway
    with several credentials builds one per :class:`PartnerConfig`."""

    partner: PartnerConfig
    auth: AuthConfig
    token: TokenConfig

    @property
    def owner(self) -> str:
        """A short, stable name for whose token this is (no secret: the App Key's
        fingerprint). Scopes the fleet's token entry."""
        return owner_key(str(self.partner.base_url), self.partner.app_key.fingerprint,
                         self.partner.partner_id)

    def policy(self) -> RenewalPolicy:
        t = self.token
        return RenewalPolicy(margin=t.token_expiry_margin, at_fraction=t.renew_at_fraction,
                             jitter_fraction=t.renew_jitter_fraction,
                             retry_min=t.renew_retry_min, retry_max=t.renew_retry_max,
                             login_retry_interval=t.login_retry_interval,
                             attempt_timeout=2 * self.auth.auth_timeout + 1)


#: The profile the ``REPAIRY_*`` settings make (the only one of a gateway without others).
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class CredentialProfile:
    """One credential profile: its name, its token side (partner, auth calls, renewal policy
    with its own token file), and whether readiness waits for it. ``default`` is the
    ``REPAIRY_*`` settings; further ones come from ``[profiles.<name>]`` tables and
    ``REPAIRY_PROFILE_<NAME>_*`` variables (:mod:`gateway.settings_profiles`)."""

    name: str
    side: TokenSide
    required: bool

    @property
    def partner(self) -> PartnerConfig:
        return self.side.partner

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PROFILE

    def own_variables(self, text: str) -> str:
        """``text`` (advice naming the ``REPAIRY_*`` variables) with this profile's own
        ``REPAIRY_PROFILE_<NAME>_*`` instead; its base URL may be the default's."""
        if self.is_default:
            return text
        own = f"REPAIRY_PROFILE_{self.name.upper()}_"
        text = re.sub(r"REPAIRY_(APP_KEY|APP_SECRET|PARTNER_ID|AUTH_)", own + r"\1", text)
        return text.replace("REPAIRY_BASE_URL",
                            f"{own}BASE_URL (or REPAIRY_BASE_URL, if it has none)")


def owner_key(upstream: str, app_key_fp: str, partner_id: str) -> str:
    """A short, stable name for whose token this is (no secret: the App Key's fingerprint)."""
    raw = json.dumps([upstream, app_key_fp, partner_id]).encode()
    return hashlib.sha256(raw).hexdigest()[:24]
