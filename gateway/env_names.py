"""Which ``GATEWAY_*``/``REPAIRY_*`` names in an environment are not settings: a typo would be
silently ignored otherwise. Kubernetes service-link variables are never counted."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final

from gateway.settings import CONFIG_ENV, SPECS, closest
from gateway.settings_profiles import PROFILES_ENV, is_profile_variable

#: Every environment variable the gateway reads (``_FILE`` variants included), but a
#: profile's ``REPAIRY_PROFILE_<NAME>_*`` (:func:`is_profile_variable`).
KNOWN_VARIABLES: Final = frozenset(
    {CONFIG_ENV, PROFILES_ENV, *(spec.env for spec in SPECS),
     *(f"{spec.env}_FILE" for spec in SPECS if spec.file_variant)})
_PREFIXES: Final = ("GATEWAY_", "REPAIRY_")
#: Kubernetes service links: every Service in the namespace sets these in every pod (a Service
#: named ``gateway`` gives ``GATEWAY_SERVICE_HOST``), so they are never a typo of ours. Told
#: apart by name *and* value: ``GATEWAY_ADMIN_PORT=9091`` is a typo, ``GATEWAY_ADMIN_PORT=
#: tcp://10.0.0.7:9091`` the link of a Service named ``gateway-admin``.
_LINK_URL: Final = re.compile(r"^(tcp|udp|sctp)://[0-9A-Fa-f:.\[\]]+:\d{1,5}$")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


#: Each shape a service link's name can take, with what its value must then be. A name may
#: read several ways (a Service named ``gateway-service`` sets ``GATEWAY_SERVICE_PORT`` to a
#: URL, one named ``gateway`` to a number): it is a link if any reading fits its value.
_LINK_SHAPES: Final = (
    (re.compile(r"^[A-Z0-9_]+_SERVICE_HOST$"), _is_ip),
    (re.compile(r"^[A-Z0-9_]+_SERVICE_PORT(_[A-Z0-9_]+)?$"), str.isdecimal),
    (re.compile(r"^[A-Z0-9_]+_PORT(_\d+_(TCP|UDP|SCTP))?$"),
     lambda value: _LINK_URL.match(value) is not None),
    (re.compile(r"^[A-Z0-9_]+_PORT_\d+_(TCP|UDP|SCTP)_PROTO$"),
     lambda value: value.lower() in ("tcp", "udp", "sctp")),
    (re.compile(r"^[A-Z0-9_]+_PORT_\d+_(TCP|UDP|SCTP)_PORT$"), str.isdecimal),
    (re.compile(r"^[A-Z0-9_]+_PORT_\d+_(TCP|UDP|SCTP)_ADDR$"), _is_ip),
)


def is_service_link(name: str, value: str) -> bool:
    """True for a Kubernetes service-link variable: a shape of its name that its value fits."""
    return any(shape.match(name) is not None and fits(value) for shape, fits in _LINK_SHAPES)


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``GATEWAY_*``/``REPAIRY_*`` variables the gateway does not read (a typo is silently
    ignored otherwise), each with the closest known name, if any. Kubernetes service-link
    variables are not reported."""
    found = []
    for name in sorted(env):
        if (name.startswith(_PREFIXES) and name not in KNOWN_VARIABLES
                and not is_profile_variable(name) and not is_service_link(name, env[name])):
            prefix = name[:name.index("_") + 1]  # compare what follows the shared prefix
            rest = {k[len(prefix):]: k for k in KNOWN_VARIABLES if k.startswith(prefix)}
            close = closest(name[len(prefix):], list(rest))
            found.append((name, rest[close] if close else None))
    return found
