"""Documents made from the setting declarations: the example config file, docs/settings.md's
table, and the effective settings of a running configuration (``repairy-gateway config``)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from gateway import __version__
from gateway.settings import CONFIG_ENV, SPECS, Settings


def render_example_config() -> str:
    """The documented example config file (``config/repairy-gateway.toml``)."""
    lines = [
        "# repairy-gateway example configuration (TOML). Every setting with its default.",
        "# Point GATEWAY_CONFIG at this file; environment variables override it.",
        "# Durations: 30s, 5m, 48h, 14d or plain seconds. Sizes: 65536, 64KiB, 100MiB.",
        "# Keep credentials out of this file: use REPAIRY_APP_SECRET_FILE and friends.",
        "",
        "[gateway]",
    ]
    section = ""
    for spec in SPECS:
        if spec.section != section:
            section = spec.section
            lines += ["", f"# --- {section} ---"]
        lines.append(f"# {spec.doc} Environment: {spec.env}.")
        if spec.default is None:
            lines.append(f'# {spec.key} = "..."  (required)')
        else:
            lines.append(f'# {spec.key} = "{spec.default}"')
    return "\n".join(lines) + "\n"


def render_settings_table() -> str:
    """docs/settings.md's settings table (Markdown), from :data:`SPECS`."""
    rows = ["| Variable | File key | Default | Meaning |", "|---|---|---|---|",
            f"| `{CONFIG_ENV}` | - | none | Optional TOML config file ([gateway] table of the "
            "file keys below). |"]
    for spec in SPECS:
        default = "required" if spec.default is None else (
            f"`{spec.default}`" if spec.default else "empty")
        rows.append(f"| `{spec.env}` | `{spec.key}` | {default} | {spec.doc} |")
    return "\n".join(rows) + "\n"


def _toml(text: str) -> str:
    """A TOML basic string: JSON's escapes, and DEL, which TOML refuses raw; a byte the
    environment did not decode (a lone surrogate) shows as its escape, as text."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _comment(text: str) -> str:
    """Text safe inside a ``#`` comment (no line break, no control character)."""
    return _toml(text)[1:-1]


def render_effective(settings: Settings, ignored: Iterable[tuple[str, str | None]] = ()) -> str:
    """Every setting in effect, with where it came from, as a TOML ``[gateway]`` table (a
    secret that is set appears commented out, redacted, with a fingerprint only where that
    cannot be cracked). ``ignored``: GATEWAY_*/REPAIRY_* variables that are not settings,
    with the closest name. The output is valid TOML whatever the values hold."""
    sources = {source.key: source for source in settings.sources}
    where = _comment(settings.config_file or "none")
    lines = [f"# repairy-gateway {__version__}: the effective settings (config file: {where}).",
             "# Each line says where its value came from; secrets are redacted and commented out.",
             "", "[gateway]"]
    section = ""
    for spec in SPECS:
        if spec.section != section:
            section = spec.section
            lines += ["", f"# --- {section} ---"]
        source = sources[spec.key]
        origin = {"default": "default", "file": f"file {source.detail}",
                  "environment": f"environment {source.detail}",
                  "override": "command option"}.get(source.origin,
                                                    f"{source.origin} {source.detail}")
        line = f"{spec.key} = {_toml(source.shown)}  # {_comment(origin)}"
        # A secret is commented out: fed back, the file must not set it to its redaction.
        lines.append(f"# {line}" if spec.secret and source.shown else line)
    for profile in settings.more_profiles:  # secrets by fingerprint only, commented out
        side, partner = profile.side, profile.partner
        lines += ["", f"[profiles.{profile.name}]",
                  f"base_url = {_toml(str(partner.base_url))}",
                  f"# app_key = \"<redacted fp:{partner.app_key.fingerprint}>\"",
                  "# app_secret = \"<redacted>\"",
                  f"partner_id = {_toml(partner.partner_id)}",
                  f"token_file = {_toml(side.token.token_file)}",
                  f"auth_token_path = {_toml(side.auth.auth_token_path)}",
                  f"auth_refresh_path = {_toml(side.auth.auth_refresh_path)}",
                  f"required = {'true' if profile.required else 'false'}"]
    ignored = list(ignored)
    if ignored:
        lines += ["", "# Not settings of repairy-gateway (ignored):"]
        lines += [f"#   {_comment(name)}" + (f" (did you mean {close}?)" if close else "")
                  for name, close in ignored]
    return "\n".join(lines) + "\n"
