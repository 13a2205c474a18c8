"""Inbound access control: who may use the gateway (client keys, CIDR allow-list) and which
routes they may reach (method + path allow-list; ``/auth/*`` is refused regardless).

Client keys are kept only as SHA-256 digests and compared in constant time; the client's
*name* is what logs and metrics see.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass

from gateway.config_values import ListenAddress, UnixAddress
from gateway.errors import ClientForbidden, ClientUnauthenticated, RouteNotAllowed

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MIN_KEY_LENGTH = 16
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ClientKey:
    name: str
    digest: bytes  # SHA-256 of the key; the key itself is not kept

    def __repr__(self) -> str:
        return f"ClientKey(name={self.name!r})"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_client_keys(value: object) -> tuple[ClientKey, ...]:
    """``name=key`` entries separated by commas or newlines (a mounted file works as is)."""
    text = value.reveal() if hasattr(value, "reveal") else str(value)
    keys: dict[str, ClientKey] = {}
    digests: set[bytes] = set()
    for raw in re.split(r"[,\n]", text):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not _NAME_RE.match(name):
            raise ValueError("entries are name=key, names of letters, digits, . _ -")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"the key of client {name!r} is shorter than {MIN_KEY_LENGTH}")
        if name in keys:
            raise ValueError(f"client {name!r} is listed twice")
        digest = _digest(key)
        if digest in digests:
            raise ValueError(f"client {name!r} reuses another client's key")
        digests.add(digest)
        keys[name] = ClientKey(name, digest)
    return tuple(keys.values())


#: ``client=profile|profile`` (the first one is the client's default); ``*`` for every client
#: not listed. A client listed nowhere may use ``default`` only.
ClientProfiles = tuple[tuple[str, tuple[str, ...]], ...]
_ENTRY = re.compile(r"^([A-Za-z0-9_.\-]{1,64}|\*)=([a-z][a-z0-9_]{0,31}(\|[a-z][a-z0-9_]{0,31})*)$")


def parse_client_profiles(value: object) -> ClientProfiles:
    """``client=eu|au, web=default, *=default`` (commas or newlines between entries)."""
    found: dict[str, tuple[str, ...]] = {}
    for raw in re.split(r"[,\n]", str(value)):
        entry = re.sub(r"\s*([=|])\s*", r"\1", raw.strip())
        if not entry or entry.startswith("#"):
            continue
        match = _ENTRY.match(entry)
        if match is None:
            # Never echoed: a client key pasted here by mistake must not reach a log.
            raise ValueError("entries are 'client=profile|profile' (the first profile is the "
                             "client's default; '*' for every other client)")
        client, names = match.group(1), tuple(dict.fromkeys(match.group(2).split("|")))
        if client in found:
            raise ValueError(f"client {client!r} is listed twice")
        found[client] = names
    return tuple(found.items())


def parse_cidrs(value: object) -> tuple[IPNetwork, ...]:
    nets = []
    for raw in str(value).split(","):
        if raw.strip():
            try:
                nets.append(ipaddress.ip_network(raw.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{raw.strip()!r} is not a CIDR (e.g. 10.0.0.0/8)") from None
    return tuple(nets)


@dataclass(frozen=True)
class RouteRule:
    method: str  # "*" for any
    pattern: str  # fnmatch glob over the decoded path ("*" also crosses "/")

    def allows(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and fnmatch.fnmatchcase(path, self.pattern)


def parse_routes(value: object) -> tuple[RouteRule, ...]:
    """``METHOD /pattern`` or ``/pattern`` entries, comma-separated; ``*`` alone allows all."""
    rules = []
    for raw in str(value).split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry == "*":
            rules.append(RouteRule("*", "*"))
            continue
        parts = entry.split()
        method, pattern = ("*", parts[0]) if len(parts) == 1 else (parts[0].upper(), parts[1])
        if len(parts) > 2 or not pattern.startswith("/") or not re.match(r"^(\*|[A-Z]+)$",
                                                                         method):
            raise ValueError(f"{entry!r} is not 'METHOD /path-glob' or '/path-glob'")
        rules.append(RouteRule(method, pattern))
    if not rules:
        raise ValueError("allow at least one route ('*' for all)")
    return tuple(rules)


def parse_header_names(value: object) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in str(value).split(",") if n.strip())
    for n in names:
        if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", n):
            raise ValueError(f"{n!r} is not a header name")
    return names


def is_loopback(address: ListenAddress) -> bool:
    if isinstance(address, UnixAddress):
        return True
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


class AccessPolicy:
    """Decides, per request, which client it is and whether it may pass."""

    def __init__(self, keys: tuple[ClientKey, ...], cidrs: tuple[IPNetwork, ...],
                 routes: tuple[RouteRule, ...], key_header: str) -> None:
        self.keys = keys
        self.cidrs = cidrs
        self.routes = routes
        self.key_header = key_header
        self._allow_all = any(rule.method == "*" and rule.pattern == "*" for rule in routes)

    def client(self, remote: str | None, presented: str | None) -> str:
        """The client's name; raises 403 for a refused address, 401 for a missing/bad key."""
        if self.cidrs and remote:  # remote is empty on a unix socket: local by definition
            try:
                ip = ipaddress.ip_address(remote.split("%")[0])
            except ValueError:
                raise ClientForbidden("the client address is not allowed") from None
            if not any(ip in net for net in self.cidrs):
                raise ClientForbidden("the client address is not allowed")
        if not self.keys:
            return ANONYMOUS
        if not presented:
            raise ClientUnauthenticated(f"a client key is required in {self.key_header}")
        digest = _digest(presented)
        found = None
        for key in self.keys:  # compare with every key: timing says nothing about which
            if hmac.compare_digest(key.digest, digest):
                found = key.name
        if found is None:
            raise ClientUnauthenticated("the client key is not valid")
        return found

    def check_route(self, method: str, path: str) -> None:
        if self._allow_all:
            return
        if not any(rule.allows(method, path) for rule in self.routes):
            raise RouteNotAllowed(f"{method} {path} is not in the gateway's allowed routes")
