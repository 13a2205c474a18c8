"""The Redis client of the fleet's stores (``redis`` is imported here, only when used)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from gateway.redact import Secret

if TYPE_CHECKING:
    from redis.asyncio import Redis


def redis_client(url: str, *, password: Secret | None, ca_file: str, timeout: float) -> Redis:
    """A Redis client for GATEWAY_REDIS_URL (``redis`` imported here, only when used)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    # One immediate retry: a restarted Redis leaves dead connections in the pool, and the
    # first command on each must not count as "the store is down".
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "health_check_interval": 30, "decode_responses": True,
                              "retry": Retry(NoBackoff(), 1),
                              "retry_on_error": [RedisConnectionError]}
    if password is not None:
        kwargs["password"] = password.reveal()
    if ca_file and url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = ca_file
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    client: Redis = aioredis.from_url(url, **kwargs)
    return client
