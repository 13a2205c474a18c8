"""The config of the fleet's shared Redis: address, credentials, key prefix, lease, outage
policy and the store key. Declared once here (:mod:`gateway.declare`); the token store, the
shared cache and the Idempotency-Key store all read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.config_values import (
    choice,
    duration_at_least,
    parse_name,
    parse_optional_file,
    parse_optional_secret,
    parse_redis_url,
)
from gateway.declare import setting
from gateway.redact import Secret


@dataclass(frozen=True)
class RedisConfig:
    """The fleet's Redis: one token, one lease, one Idempotency-Key store."""

    SECTION: ClassVar[str] = "fleet"

    redis_url: str = setting(
        "GATEWAY_REDIS_URL", parse_redis_url, "",
        "Shared store for a fleet (redis:// or rediss://): the token (taking precedence over "
        "GATEWAY_TOKEN_FILE), Idempotency-Key records, the GET cache if shared. Empty: this "
        "process keeps its own.")
    redis_password: Secret | None = setting(
        "GATEWAY_REDIS_PASSWORD", parse_optional_secret, "",
        "Redis password (or GATEWAY_REDIS_PASSWORD_FILE).",
        file_variant=True, secret=True)
    redis_ca_file: str = setting(
        "GATEWAY_REDIS_CA_FILE", parse_optional_file, "",
        "PEM CA bundle to verify a rediss:// server (empty: system CAs).")
    redis_key_prefix: str = setting(
        "GATEWAY_REDIS_KEY_PREFIX", parse_name, "repairy-gateway",
        "Prefix of the store's keys (the rest is derived from upstream, App Key, Partner ID).")
    redis_lease_ttl: float = setting(
        "GATEWAY_REDIS_LEASE_TTL", duration_at_least(1.0), "5s",
        "Lifetime of the fleet's renewal lease (extended every third of it while renewing; "
        "store calls time out at half of it, at most 2s). At least 1s.")
    redis_down_policy: str = setting(
        "GATEWAY_REDIS_DOWN_POLICY", choice("local", "wait"), "local",
        "Redis down when renewal is due: local (renew here in the last part of the token's "
        "usable life) or wait.")
    store_key: Secret | None = setting(
        "GATEWAY_STORE_KEY", parse_optional_secret, "",
        "Encrypt tokens in the store with this key (AES-GCM; or GATEWAY_STORE_KEY_FILE).",
        file_variant=True, secret=True)
    store_key_previous: Secret | None = setting(
        "GATEWAY_STORE_KEY_PREVIOUS", parse_optional_secret, "",
        "Another store key, for reading only (or GATEWAY_STORE_KEY_PREVIOUS_FILE); 'plain' "
        "reads entries written without a key. For the steps of a store key rotation "
        "(docs/deployment.md).",
        file_variant=True, secret=True)
