"""Credential profiles beyond ``default``: read, validate and compose them.

``default`` is the ``REPAIRY_*`` settings, unchanged. A further profile is named in a
``[profiles.<name>]`` table of the config file, or in ``GATEWAY_PROFILES`` (comma-separated
names); its values come from that table and from ``REPAIRY_PROFILE_<NAME>_<FIELD>`` variables
(``<NAME>`` upper-cased; the environment wins, ``*_FILE`` for the secrets). Fields:

=========================  ===================================================================
``base_url``               optional: the default profile's ``REPAIRY_BASE_URL``
``app_key``, ``app_secret`` required (``_FILE`` variants: a Kubernetes secret mount)
``partner_id``             required (``_FILE`` too)
``token_file``             optional: where this profile's token is kept (empty: memory only)
``auth_token_path`` ...    optional: the ``REPAIRY_AUTH_*`` paths and fields, where they differ
``required``               optional, false: readiness waits for this profile too
=========================  ===================================================================

Every problem, of every profile, is reported with the others (``SettingsError``), each named
by the variable or the file key it came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.config_values import (
    TcpAddress,
    parse_base_url,
    parse_bool,
    parse_name,
    parse_optional_path,
    parse_path,
    parse_secret,
)
from gateway.proxy.access import is_loopback
from gateway.redact import Secret
from gateway.token.config import (
    DEFAULT_PROFILE,
    AuthConfig,
    CredentialProfile,
    PartnerConfig,
    TokenSide,
)

PROFILES_ENV: Final = "GATEWAY_PROFILES"
ENV_PREFIX: Final = "REPAIRY_PROFILE_"
#: A profile's name: what callers send in the credential header, and a metric label value.
NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: At most this many profiles (each holds a token, a pool and labels on the metrics).
MAX_PROFILES: Final = 32

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class _Field:
    key: str
    parse: Callable[[object], Any]
    required: bool = False
    file_variant: bool = False
    secret: bool = False

    def env(self, name: str) -> str:
        return f"{ENV_PREFIX}{name.upper()}_{self.key.upper()}"


_AUTH_FIELDS: Final = ("auth_token_path", "auth_refresh_path", "auth_app_key_field",
                       "auth_app_secret_field", "auth_refresh_token_field")
FIELDS: Final = (
    _Field("base_url", parse_base_url),
    _Field("app_key", parse_secret, True, True, True),
    _Field("app_secret", parse_secret, True, True, True),
    _Field("partner_id", parse_name, True, True),
    _Field("token_file", parse_optional_path),
    _Field("auth_token_path", parse_path), _Field("auth_refresh_path", parse_path),
    _Field("auth_app_key_field", parse_name), _Field("auth_app_secret_field", parse_name),
    _Field("auth_refresh_token_field", parse_name),
    _Field("required", parse_bool),
)
_BY_KEY: Final = {f.key: f for f in FIELDS}
#: Every ``REPAIRY_PROFILE_<NAME>_<SUFFIX>`` suffix, longest first (``APP_KEY_FILE`` before
#: ``APP_KEY``), for telling a variable's profile from its field.
SUFFIXES: Final = tuple(sorted({*(f.key.upper() for f in FIELDS), *(
    f"{f.key.upper()}_FILE" for f in FIELDS if f.file_variant)}, key=len, reverse=True))


def profile_of(name: str) -> str | None:
    """The profile a ``REPAIRY_PROFILE_<NAME>_<FIELD>`` variable names (lower case), or None
    when it is not one (``<FIELD>`` is matched longest first: ``APP_KEY_FILE`` before
    ``APP_KEY``, so ``EU_WEST_APP_KEY`` names ``eu_west``, never ``eu``)."""
    if not name.startswith(ENV_PREFIX):
        return None
    rest = name[len(ENV_PREFIX):]
    for suffix in SUFFIXES:
        if rest.endswith("_" + suffix) and NAME.match(rest[:-len(suffix) - 1].lower()):
            return rest[:-len(suffix) - 1].lower()
    return None


def is_profile_variable(name: str) -> bool:
    """``REPAIRY_PROFILE_<NAME>_<FIELD>``, of any profile name (the loader reports those of
    an undeclared profile)."""
    return profile_of(name) is not None


@dataclass(frozen=True)
class LoadedProfiles:
    profiles: tuple[CredentialProfile, ...]
    #: (``profiles.<name>.<key>``, path) for every value read from a ``*_FILE``.
    secret_files: tuple[tuple[str, str], ...]


def declared_names(tables: Mapping[str, Any], env: Mapping[str, str],
                   problems: Problems, where: str) -> list[str]:
    """The further profiles' names: the file's tables, then ``GATEWAY_PROFILES`` (a name in
    both is one profile: its table and its variables; only a repeat within the variable is
    a problem)."""
    names: list[str] = []
    listed = [n.strip() for n in env.get(PROFILES_ENV, "").split(",") if n.strip()]
    for name in sorted({n for n in listed if listed.count(n) > 1}):
        problems.append((PROFILES_ENV, f"profile {name!r} is named twice"))
    for name in dict.fromkeys([*tables, *listed]):  # in both: one profile
        origin = f"profiles.{name} (in {where})" if name in tables else PROFILES_ENV
        if name == DEFAULT_PROFILE:
            problems.append((origin, "'default' is the REPAIRY_* settings: name the others "
                                     "differently"))
        elif not NAME.match(name):
            problems.append((origin, f"{name!r} is not a profile name: a lower-case letter, "
                                     "then up to 31 of a-z 0-9 _"))
        else:
            names.append(name)
    if len(names) + 1 > MAX_PROFILES:
        problems.append((PROFILES_ENV, f"at most {MAX_PROFILES} profiles, default included"))
    return names


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().rstrip("\r\n")


def load_profiles(default: CredentialProfile | None, tables: Mapping[str, Any],
                  env: Mapping[str, str], where: str, problems: Problems) -> LoadedProfiles:
    """``default`` and every further profile, in declaration order; problems are appended
    to ``problems`` (nothing is raised here). Without ``default`` (its own settings have
    problems) the further profiles are only checked, so every problem shows at once."""
    names = declared_names(tables, env, problems, where)
    for var in sorted(env):
        named = profile_of(var)
        if named is not None and named not in names:
            problems.append((var, "names no declared profile: list it in GATEWAY_PROFILES "
                                  "or give it a [profiles.<name>] table"))
    profiles: list[CredentialProfile] = [] if default is None else [default]
    files: list[tuple[str, str]] = []
    for name in names:
        table = tables.get(name, {})
        if not isinstance(table, dict):
            problems.append((f"profiles.{name} (in {where})", "must be a table"))
            continue
        for key in table:
            if key not in _BY_KEY:
                problems.append((f"profiles.{name}.{key} (in {where})",
                                 "unknown profile field; known: " + ", ".join(_BY_KEY)))
        values: dict[str, Any] = {}
        for f in FIELDS:
            raw: object | None = table.get(f.key)
            origin = f"profiles.{name}.{f.key} (in {where})"
            var = f.env(name)
            if f.file_variant and env.get(var + "_FILE"):
                if env.get(var):
                    problems.append((var, f"set either {var} or {var}_FILE, not both"))
                    continue
                try:
                    raw = _read(env[var + "_FILE"])
                except OSError as exc:
                    problems.append((var + "_FILE", f"cannot read {env[var + '_FILE']}: "
                                                    f"{exc.strerror}"))
                    continue
                origin = var + "_FILE"
                files.append((f"profiles.{name}.{f.key}", env[var + "_FILE"]))
            elif env.get(var, "") != "":
                raw, origin = env[var], var
            if raw is not None and not isinstance(raw, str | bool | int | float):
                problems.append((origin, "must be a string" + (
                    " or true/false" if f.key == "required" else "")))
                continue
            if raw is None:
                if f.required:
                    problems.append((var, f"required for profile {name!r}; set {var}"
                                          + (f" (or {var}_FILE)" if f.file_variant else "")
                                          + f" or {f.key} in [profiles.{name}]"))
                continue
            try:
                values[f.key] = f.parse(raw)
            except (ValueError, TypeError) as exc:
                problems.append((origin, str(exc) or "invalid value"))
        if default is not None and all(f.key in values for f in FIELDS if f.required):
            profiles.append(_compose(name, default, values))
    return LoadedProfiles(tuple(profiles), tuple(files))


def _compose(name: str, default: CredentialProfile, v: Mapping[str, Any]) -> CredentialProfile:
    side = default.side
    app_key: Secret = v["app_key"]
    partner = PartnerConfig(v.get("base_url", side.partner.base_url), app_key,
                            v["app_secret"], v["partner_id"])
    auth: AuthConfig = dataclasses.replace(side.auth, **{k: v[k] for k in _AUTH_FIELDS
                                                         if k in v})
    token = dataclasses.replace(side.token, token_file=v.get("token_file", ""))
    return CredentialProfile(name, TokenSide(partner, auth, token), bool(v.get("required")))


def profile_problems(profiles: tuple[CredentialProfile, ...], allow_insecure: bool,
                     grants: tuple[tuple[str, tuple[str, ...]], ...] = (),
                     keyed: bool = False) -> Problems:
    """Problems across profiles: two must not share a token (same owner: the fleet's entry
    would be fought over) or a token file; the client grants (GATEWAY_CLIENT_PROFILES) name
    configured profiles, and need client keys. A grant for a client without a key is no
    problem here (a revoked key must not stop a reload): the gateway warns at start."""
    found: Problems = []
    names = {p.name for p in profiles}
    if grants and not keyed:
        found.append(("GATEWAY_CLIENT_PROFILES", "needs GATEWAY_CLIENT_KEYS: without client "
                      "keys any profile may be chosen"))
    for client, allowed in grants:
        for name in allowed:
            if name not in names:
                found.append(("GATEWAY_CLIENT_PROFILES", f"client {client!r}: no profile "
                              f"named {name!r} (profiles: {', '.join(sorted(names))})"))
    owners: dict[str, str] = {}
    files: dict[str, str] = {}
    for p in profiles:
        where = "REPAIRY_PARTNER_ID" if p.is_default else f"{ENV_PREFIX}{p.name.upper()}_APP_KEY"
        # One credential on one Repairy (whatever path or trailing slash its base URL has) is
        # one token: with one live token per credential, two profiles would revoke each other.
        same = (str(p.partner.base_url.origin()), p.partner.app_key.fingerprint,
                p.partner.partner_id)
        other = owners.setdefault(repr(same), p.name)
        if other != p.name:
            found.append((where, f"profile {p.name!r} has the same upstream, App Key and "
                                 f"Partner ID as {other!r}: one profile per credential"))
        auth, default_auth = p.side.auth, profiles[0].side.auth
        if not p.is_default and auth.auth_token_path == auth.auth_refresh_path and (
                (auth.auth_token_path, auth.auth_refresh_path) != (
                    default_auth.auth_token_path, default_auth.auth_refresh_path)):
            found.append((f"{ENV_PREFIX}{p.name.upper()}_AUTH_REFRESH_PATH",
                          "must differ from the login path"))
        path = p.side.token.token_file
        if path:
            seen = files.setdefault(os.path.abspath(path), p.name)
            if seen != p.name:
                found.append((f"{ENV_PREFIX}{p.name.upper()}_TOKEN_FILE",
                              f"the same file as profile {seen!r}'s token: give each its own"))
        url = p.partner.base_url
        if url.scheme == "http" and not is_loopback(TcpAddress(url.host or "", 0)) and (
                not p.is_default and not allow_insecure):  # the default's: settings.py
            found.append((f"{ENV_PREFIX}{p.name.upper()}_BASE_URL", "http:// would send "
                          "the token in clear: use https://, or set "
                          "GATEWAY_ALLOW_INSECURE_UPSTREAM=true"))
    return found
