"""Which ``GATEWAY_*``/``REPAIRY_*`` names in an environment are not settings: a typo would be
silently ignored otherwise. Kubernetes service-link variables are never counted."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final

from gateway.settings import CONFIG_ENV, SPECS, closest

#: Every environment variable the gateway reads (``_FILE`` variants included).
KNOWN_VARIABLES: Final = frozenset(
    {CONFIG_ENV, *(spec.env for spec in SPECS),
     *(f"{spec.env}_FILE" for spec in SPECS if spec.file_variant)})
_PREFIXES: Final = ("GATEWAY_", "REPAIRY_")
#: Kubernetes service links: every Service in the namespace sets these in every pod (a Service
#: named ``gateway`` gives ``GATEWAY_SERVICE_HOST``), so they are never a typo of ours. Told
#: apart by name *and* value: ``GATEWAY_ADMIN_PORT=9091`` is a typo, ``GATEWAY_ADMIN_PORT=
#: tcp://10.0.0.7:9091`` the link of a Service named ``gateway-admin``.
_LINK_NAME: Final = re.compile(
    r"^[A-Z0-9_]+?_(?:(?P<host>SERVICE_HOST)|(?P<sport>SERVICE_PORT(?:_[A-Z0-9_]+)?)"
    r"|(?P<url>PORT(?:_\d+_(?:TCP|UDP|SCTP))?)|PORT_\d+_(?:TCP|UDP|SCTP)_(?P<part>PROTO|PORT|ADDR))$")
_LINK_URL: Final = re.compile(r"^(tcp|udp|sctp)://[0-9A-Fa-f:.\[\]]+:\d{1,5}$")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_service_link(name: str, value: str) -> bool:
    """True for a Kubernetes service-link variable: its name's shape and its value's."""
    m = _LINK_NAME.match(name)
    if m is None:
        return False
    if m["host"] or m["part"] == "ADDR":
        return _is_ip(value)
    if m["sport"] or m["part"] == "PORT":
        return value.isdigit()
    if m["part"] == "PROTO":
        return value in ("TCP", "UDP", "SCTP", "tcp", "udp", "sctp")
    return _LINK_URL.match(value) is not None


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``GATEWAY_*``/``REPAIRY_*`` variables the gateway does not read (a typo is silently
    ignored otherwise), each with the closest known name, if any. Kubernetes service-link
    variables are not reported."""
    found = []
    for name in sorted(env):
        if (name.startswith(_PREFIXES) and name not in KNOWN_VARIABLES
                and not is_service_link(name, env[name])):
            prefix = name[:name.index("_") + 1]  # compare what follows the shared prefix
            rest = {k[len(prefix):]: k for k in KNOWN_VARIABLES if k.startswith(prefix)}
            close = closest(name[len(prefix):], list(rest))
            found.append((name, rest[close] if close else None))
    return found
