"""Settings: read the environment and the file, validate, compose the components' configs.

Sources, later wins: built-in defaults → the TOML file named by ``GATEWAY_CONFIG`` → the
environment (``<NAME>_FILE`` for credentials: a Kubernetes secret mount). Each setting is
declared once, as a field of its component's config (:mod:`gateway.declare`); :data:`SPECS`
collects them for parsing and for the documents made from them (:mod:`gateway.settings_docs`).
Every problem, of a single field or across fields, is reported at once. Only this module (and
the command line, for its own checks) reads the environment.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from yarl import URL

from gateway.config_values import TcpAddress
from gateway.coordination.config import RedisConfig
from gateway.declare import Spec, build, specs_of
from gateway.logs import LogConfig
from gateway.proxy.access import is_loopback
from gateway.proxy.config import (
    CacheConfig,
    GuardConfig,
    IdempotencyConfig,
    InboundConfig,
    ProxyConfig,
    RequestPathConfig,
    UpstreamConfig,
)
from gateway.proxy.idempotency import LEASE_MARGIN, leader_deadline
from gateway.redact import fingerprint
from gateway.serving import ServerConfig
from gateway.settings_profiles import load_profiles, profile_problems
from gateway.token.config import (
    DEFAULT_PROFILE,
    AuthConfig,
    CredentialProfile,
    PartnerConfig,
    TokenConfig,
    TokenSide,
)
from gateway.tracing import TracingConfig

__all__ = ["CONFIG_ENV", "SPECS", "Settings", "SettingsError", "Source", "Spec", "load_settings"]


@dataclass(frozen=True)
class Source:
    """Where a setting's value came from, and its text as given (secrets: a fingerprint)."""

    key: str
    origin: str  # "default", "file", "environment", "<NAME>_FILE", "override"
    detail: str  # the variable, or the file's path
    shown: str


#: Secrets whose fingerprint may be shown (random keys, or logged already); the others, which
#: may be weak passwords, only as set or not: a 48-bit fingerprint of a weak one is a hash to
#: crack.
_FINGERPRINTED: Final = frozenset({"app_key", "store_key", "store_key_previous"})


def _shown(spec: Spec, raw: object) -> str:
    if spec.secret:
        if not str(raw):
            return ""
        return (f"<redacted fp:{fingerprint(str(raw))}>" if spec.key in _FINGERPRINTED
                else "<redacted>")
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)


class SettingsError(Exception):
    """Settings are missing or invalid: ``setting``/``problem`` name the first, ``problems``
    all of them; ``str()`` is one line for each."""

    def __init__(self, setting: str, problem: str,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        self.setting = setting
        self.problem = problem
        self.problems: list[tuple[str, str]] = [(setting, problem), *more]
        super().__init__("\n".join(f"invalid setting {name}: {why}"
                                    for name, why in self.problems))


@dataclass(frozen=True)
class Settings:
    """Every setting, typed, as the components' configs. Build with :func:`load_settings`."""

    partner: PartnerConfig
    upstream: UpstreamConfig
    guards: GuardConfig
    cache: CacheConfig
    idempotency: IdempotencyConfig
    auth: AuthConfig
    token: TokenConfig
    redis: RedisConfig
    proxy: ProxyConfig
    inbound: InboundConfig
    server: ServerConfig
    log: LogConfig
    tracing: TracingConfig
    config_file: str | None = field(default=None)
    #: (setting key, path) for every setting read from a ``*_FILE`` (watched for rotation).
    secret_files: tuple[tuple[str, str], ...] = field(default=())
    #: Per setting: its key, where its value came from (default, the file, the environment, a
    #: ``*_FILE``, an override) and its text as given, a fingerprint for secrets.
    sources: tuple[Source, ...] = field(default=(), compare=False)
    #: The credential profiles, ``default`` (the ``REPAIRY_*`` settings) first.
    more_profiles: tuple[CredentialProfile, ...] = field(default=())

    @property
    def profiles(self) -> tuple[CredentialProfile, ...]:
        """Every credential profile, ``default`` first (built from the current ``partner``,
        so a rotation of the default credentials shows here too)."""
        return (CredentialProfile(DEFAULT_PROFILE, self.token_side(), True),
                *self.more_profiles)

    def value(self, key: str) -> Any:
        """A setting's value by its file key (for generic code: comparing, printing)."""
        return getattr(getattr(self, _GROUP_OF[key]), key)

    def request_path(self) -> RequestPathConfig:
        """What the request path reads."""
        return RequestPathConfig(self.partner.base_url,
                                 tuple(dict.fromkeys(path for p in self.profiles for path in (
                                     p.side.auth.auth_token_path,
                                     p.side.auth.auth_refresh_path))),
                                 self.token.token_wait_timeout, self.upstream, self.proxy,
                                 self.inbound, self.idempotency)

    def token_side(self) -> TokenSide:
        """What the token manager needs (one per credential, were there several)."""
        return TokenSide(self.partner, self.auth, self.token)


#: The components' configs, in documentation order: (attribute of Settings, config class).
_CONFIGS: Final = (
    ("partner", PartnerConfig), ("upstream", UpstreamConfig), ("guards", GuardConfig),
    ("cache", CacheConfig), ("idempotency", IdempotencyConfig), ("auth", AuthConfig),
    ("token", TokenConfig), ("redis", RedisConfig), ("proxy", ProxyConfig),
    ("inbound", InboundConfig), ("server", ServerConfig), ("log", LogConfig),
    ("tracing", TracingConfig))
#: Every setting, in documentation order. ``default=None`` means required (for ``serve``).
SPECS: Final = tuple(spec for _, config in _CONFIGS for spec in specs_of(config))
_GROUP_OF: Final = {spec.key: name for name, config in _CONFIGS for spec in specs_of(config)}
CONFIG_ENV: Final = "GATEWAY_CONFIG"
_BY_KEY: Final = {s.key: s for s in SPECS}


def _read_file_setting(spec: Spec, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{spec.env}_FILE", f"cannot read {path}: {exc.strerror}") from None


def closest(name: str, known: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return close[0] if close else None


def _load_file(path: str) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
    """The file's ``[gateway]`` table, its ``[profiles.<name>]`` tables, and a problem for
    each key that is not a setting."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(CONFIG_ENV, f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(CONFIG_ENV, f"{path} is not valid TOML: {exc}") from None
    raw = data.get("gateway", data)
    if not isinstance(raw, dict):
        raise SettingsError(CONFIG_ENV, f"{path}: [gateway] must be a table")
    table = dict(raw)
    nested = table.pop("profiles", None)
    if nested is not None and "gateway" in data and "profiles" in data:
        raise SettingsError(CONFIG_ENV, f"{path}: profiles are in both [profiles] and "
                                        "[gateway.profiles]: keep one")
    profiles = nested if nested is not None else data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise SettingsError(CONFIG_ENV, f"{path}: [profiles] must hold a table per profile")
    unknown = []
    for key in table:
        if key not in _BY_KEY:
            close = closest(key, list(_BY_KEY))
            unknown.append((f"{key} (in {path})", "unknown setting"
                            + (f"; did you mean {close}?" if close else "")))
    return {k: v for k, v in table.items() if k in _BY_KEY}, profiles, unknown


def load_settings(env: Mapping[str, str] | None = None, *, config_file: str | None = None,
                  overrides: Mapping[str, object] | None = None) -> Settings:
    """Load and validate every setting; raise :class:`SettingsError` naming every bad one.

    ``env`` defaults to the process environment; ``overrides`` (by file key) win over all.
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    from_file, tables, problems = _load_file(config_file) if config_file else ({}, {}, [])
    values: dict[str, Any] = {}
    sources: list[Source] = []
    secret_files: list[tuple[str, str]] = []
    for spec in SPECS:
        raw: object | None = spec.default
        origin, source, detail = spec.env, "default", ""
        if spec.key in from_file:
            raw, origin = from_file[spec.key], f"{spec.key} (in {config_file})"
            source, detail = "file", str(config_file)
        file_var = f"{spec.env}_FILE"
        if spec.file_variant and env.get(file_var):
            if env.get(spec.env):
                problems.append((spec.env, f"set either {spec.env} or {file_var}, not both"))
                continue
            try:
                raw = _read_file_setting(spec, env[file_var])
            except SettingsError as exc:
                problems.extend(exc.problems)
                continue
            origin, source, detail = file_var, file_var, env[file_var]
            secret_files.append((spec.key, env[file_var]))
        elif env.get(spec.env, "") != "":
            raw, origin, source, detail = env[spec.env], spec.env, "environment", spec.env
        if overrides and spec.key in overrides:
            raw, origin, source, detail = overrides[spec.key], spec.env, "override", ""
        if raw is None:
            extra = f" (or {file_var})" if spec.file_variant else ""
            problems.append((spec.env, f"required; set {spec.env}{extra}"))
            continue
        try:
            values[spec.key] = spec.parse(raw)
        except (ValueError, TypeError) as exc:
            problems.append((origin, str(exc) or "invalid value"))
        sources.append(Source(spec.key, source, detail, _shown(spec, raw)))
    default = None
    if {s.key for c in (PartnerConfig, AuthConfig, TokenConfig) for s in specs_of(c)} <= (
            values.keys()):  # the default profile is whole: the others build on it
        v = values
        default = CredentialProfile(DEFAULT_PROFILE, TokenSide(
            build(PartnerConfig, v), build(AuthConfig, v), build(TokenConfig, v)), True)
    more = load_profiles(default, tables, env, str(config_file), problems)
    if default is not None:  # the profiles' cross checks, with the single-field problems
        problems += profile_problems(more.profiles,
                                     bool(values.get("allow_insecure_upstream")),
                                     values.get("client_profiles", ()),
                                     bool(values.get("client_keys")))
    if problems:  # every one at once: fixing them one run at a time is no fun
        raise SettingsError(*problems[0], more=problems[1:])
    v = values
    settings = Settings(
        build(PartnerConfig, v), build(UpstreamConfig, v), build(GuardConfig, v),
        build(CacheConfig, v), build(IdempotencyConfig, v), build(AuthConfig, v),
        build(TokenConfig, v), build(RedisConfig, v), build(ProxyConfig, v),
        build(InboundConfig, v), build(ServerConfig, v), build(LogConfig, v),
        build(TracingConfig, v), config_file=config_file,
        secret_files=(*secret_files, *more.secret_files), sources=tuple(sources),
        more_profiles=more.profiles[1:])
    problems = _problems(settings)
    if problems:
        raise SettingsError(*problems[0], more=problems[1:])
    return settings


def _problems(s: Settings) -> list[tuple[str, str]]:
    """Every cross-field problem (single-field ones are the parsers')."""
    found: list[tuple[str, str]] = []  # (the profiles' own: load_settings, with the others)
    add = found.append
    if s.token.renew_retry_min > s.token.renew_retry_max:
        add(("GATEWAY_RENEW_RETRY_MIN", "must not exceed GATEWAY_RENEW_RETRY_MAX"))
    if s.token.renew_jitter_fraction >= s.token.renew_at_fraction:
        add(("GATEWAY_RENEW_JITTER_FRACTION",
             "must be below GATEWAY_RENEW_AT_FRACTION"))
    if s.token.contention_window <= 2 * s.token.login_retry_interval:
        add(("GATEWAY_CONTENTION_WINDOW", "must exceed twice GATEWAY_LOGIN_RETRY_INTERVAL "
             "(logins are spaced by it while contention lasts)"))
    redis, cache = s.redis, s.cache
    if (redis.redis_password is not None or redis.store_key is not None
            or redis.store_key_previous is not None) and not (redis.redis_url
                                                              or cache.cache_redis_url):
        add(("GATEWAY_REDIS_URL", "GATEWAY_REDIS_PASSWORD / GATEWAY_STORE_KEY "
             "are set, but no GATEWAY_REDIS_URL: set it, or drop them"))
    if s.idempotency.idempotency_max_body > 8 * 1024 * 1024:
        add(("GATEWAY_IDEMPOTENCY_MAX_BODY", "must be at most 8MiB"))
    if s.idempotency.idempotency_max_bytes < 2 * s.idempotency.idempotency_max_body:
        add(("GATEWAY_IDEMPOTENCY_MAX_BYTES", "must hold at least two answers "
             "of GATEWAY_IDEMPOTENCY_MAX_BODY"))
    if s.idempotency.idempotency_routes and not s.upstream.total_timeout:
        add(("GATEWAY_TOTAL_TIMEOUT", "must be a duration, not 0 (no limit), "
             "while GATEWAY_IDEMPOTENCY_ROUTES is on: a booking's claim must "
             "have a bound (or set GATEWAY_IDEMPOTENCY_ROUTES=off)"))
    least = s.idempotency.idempotency_wait + leader_deadline(
        s.token.token_wait_timeout, s.upstream.connect_timeout,
        s.upstream.total_timeout) + LEASE_MARGIN
    if s.idempotency.idempotency_routes and s.idempotency.idempotency_ttl < least:
        add(("GATEWAY_IDEMPOTENCY_TTL", f"must be at least {least:g}s: "
             "GATEWAY_IDEMPOTENCY_WAIT + GATEWAY_TOKEN_WAIT_TIMEOUT + "
             "GATEWAY_CONNECT_TIMEOUT + GATEWAY_TOTAL_TIMEOUT + 5s (a claim "
             "must outlive its leader's lease and the repeats waiting on it)"))
    if s.cache.cache_shared and not (s.redis.redis_url or s.cache.cache_redis_url):
        add(("GATEWAY_CACHE_SHARED", "needs GATEWAY_REDIS_URL (the fleet's "
             "Redis) or GATEWAY_CACHE_REDIS_URL to share the cache through"))
    if (cache.cache_redis_url or cache.cache_redis_password is not None) and not cache.cache_shared:
        add(("GATEWAY_CACHE_REDIS_URL", "is only used with "
             "GATEWAY_CACHE_SHARED=true: set it, or drop the cache's Redis"))
    if s.cache.cache_redis_password is not None and not s.cache.cache_redis_url:
        add(("GATEWAY_CACHE_REDIS_PASSWORD", "is set, but no "
             "GATEWAY_CACHE_REDIS_URL"))
    if s.cache.cache_shared and s.cache.cache_shared_max_bytes < 3 * s.cache.cache_max_entry:
        add(("GATEWAY_CACHE_SHARED_MAX_BYTES", "must be at least 3 times "
             "GATEWAY_CACHE_MAX_ENTRY (an entry takes a third more in Redis)"))
    previous = None if s.redis.store_key_previous is None else s.redis.store_key_previous.reveal()
    if previous == "plain" and s.redis.store_key is None:
        add(("GATEWAY_STORE_KEY_PREVIOUS", "'plain' reads entries written "
             "without a key, which a gateway without GATEWAY_STORE_KEY does "
             "anyway: drop it"))
    if previous is not None and previous != "plain" and len(previous) < 32:
        add(("GATEWAY_STORE_KEY_PREVIOUS", "must be at least 32 characters, "
             "or 'plain'"))
    if s.upstream.egress_proxy_password is not None and not URL(s.upstream.egress_proxy).user:
        add(("GATEWAY_EGRESS_PROXY_PASSWORD", "is set, but GATEWAY_EGRESS_PROXY "
             "names no user (http://user@proxy:3128)"))
    if s.redis.redis_ca_file and not s.redis.redis_url.startswith("rediss://"):
        add(("GATEWAY_REDIS_CA_FILE", "only applies to a rediss:// "
             "GATEWAY_REDIS_URL (TLS)"))
    if s.redis.store_key is not None and len(s.redis.store_key.reveal()) < 32:
        add(("GATEWAY_STORE_KEY", "must be at least 32 characters of random "
             "(e.g. openssl rand -base64 32)"))
    if s.token.persistent_401_cooldown > s.token.persistent_401_cooldown_max:
        add(("GATEWAY_PERSISTENT_401_COOLDOWN",
             "must not exceed GATEWAY_PERSISTENT_401_COOLDOWN_MAX"))
    if s.proxy.max_body_size and s.proxy.replay_body_limit > s.proxy.max_body_size:
        add(("GATEWAY_REPLAY_BODY_LIMIT", "must not exceed GATEWAY_MAX_BODY_SIZE"))
    if s.guards.retry_backoff_min > s.guards.retry_backoff_max:
        add(("GATEWAY_RETRY_BACKOFF_MIN", "must not exceed "
             "GATEWAY_RETRY_BACKOFF_MAX"))
    if s.guards.upstream_concurrency > s.upstream.pool_size:
        add(("GATEWAY_UPSTREAM_CONCURRENCY", f"must not exceed GATEWAY_POOL_SIZE "
             f"({s.upstream.pool_size}): raise the pool size too"))
    if s.auth.auth_token_path == s.auth.auth_refresh_path:
        add(("REPAIRY_AUTH_REFRESH_PATH", "must differ from the login path"))
    inbound, base_url = s.inbound, s.partner.base_url
    if not is_loopback(s.proxy.listen) and not inbound.client_keys and not inbound.allowed_cidrs:
        add(("GATEWAY_LISTEN", f"{s.proxy.listen} is not loopback: set "
             "GATEWAY_CLIENT_KEYS and/or GATEWAY_ALLOWED_CIDRS so that not "
             "everyone who can reach it acts as the partner"))
    if base_url.scheme == "http" and not s.upstream.allow_insecure_upstream and not _loopback_host(
            base_url.host or ""):
        add(("REPAIRY_BASE_URL", "http:// would send the token in clear: use "
             "https://, or set GATEWAY_ALLOW_INSECURE_UPSTREAM=true"))
    return found


def _loopback_host(host: str) -> bool:
    return is_loopback(TcpAddress(host, 0))
