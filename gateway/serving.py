"""The process-level config: admin listener, worker processes, event loop, shutdown timing and
how often mounted credential files are re-read. Declared once here (:mod:`gateway.declare`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from gateway.config_values import (
    TcpAddress,
    bounded_int,
    choice,
    duration_at_least,
    parse_admin_listen,
    parse_duration,
)
from gateway.declare import setting

#: Most worker processes: each is a whole interpreter with its own upstream pool, and the
#: supervisor fans every token out to them and merges their metrics every second; past a few
#: per core they add memory and upstream connections, not throughput.
MAX_WORKERS: Final = 32


@dataclass(frozen=True)
class ServerConfig:
    """How the gateway runs as processes and stops."""

    SECTION: ClassVar[str] = "server"

    admin_listen: TcpAddress = setting(
        "GATEWAY_ADMIN_LISTEN", parse_admin_listen, "127.0.0.1:9091",
        "Admin listener (/healthz, /readyz, /tokenz, /metrics): host:port.")
    workers: int = setting(
        "GATEWAY_WORKERS", bounded_int(1, MAX_WORKERS), "1",
        "Proxy worker processes, 1 to 32; above 1 a supervisor keeps the one token and hands "
        "it to them (one login for all).")
    event_loop: str = setting(
        "GATEWAY_EVENT_LOOP", choice("uvloop", "asyncio"), "uvloop",
        "Event loop: uvloop (faster; falls back to asyncio where it is not installed) or "
        "asyncio.")
    shutdown_delay: float = setting(
        "GATEWAY_SHUTDOWN_DELAY", parse_duration, "0s",
        "On SIGTERM, keep serving (not ready) this long so load balancers notice first.")
    shutdown_grace: float = setting(
        "GATEWAY_SHUTDOWN_GRACE", parse_duration, "20s",
        "On SIGTERM, how long in-flight requests get to finish.")
    secrets_poll_interval: float = setting(
        "GATEWAY_SECRETS_POLL_INTERVAL", duration_at_least(0.05, zero_is_off=True), "10s",
        "How often *_FILE credentials are checked for changes (0: only on SIGHUP). At least "
        "50ms.")
