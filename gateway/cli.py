"""The ``repairy-gateway`` command line: ``serve``, ``sandbox``, ``demo``, ``check``,
``config``.

Parses arguments, turns a bad setting into one line on stderr and exit status 2, and runs the
chosen command's coroutine with SIGTERM/SIGINT wired to a clean stop. Logs follow
``GATEWAY_LOG_FORMAT`` in every command (``auto``: text on a terminal, JSON otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gateway import __version__
from gateway.config_values import parse_duration
from gateway.env_names import unknown_variables
from gateway.sandbox.server import serve_forever
from gateway.sandbox.state import (
    ACCESS_TTL,
    DEFAULT_APP_SECRET,
    REFRESH_TTL,
    SandboxConfig,
    numbered_partner,
)
from gateway.settings import SPECS, Settings, SettingsError, load_settings

EXIT_CONFIG = 2


def _settings_epilog(intro: str) -> str:
    sections = list(dict.fromkeys(spec.section for spec in SPECS))
    return (f"{intro}\nSetting groups: {', '.join(sections)}.\n"
            "Each setting is an environment variable (or a key of the TOML file named by "
            "GATEWAY_CONFIG):\nsee docs/settings.md, or run 'repairy-gateway config'.")


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_sandbox_options(p: argparse.ArgumentParser, partners: int = 1) -> None:
    defaults = SandboxConfig()
    p.add_argument("--app-key", default=defaults.app_key, help="accepted App Key")
    p.add_argument("--app-secret", default=defaults.app_secret, help="accepted App Secret")
    p.add_argument("--partner-id", default=defaults.partner_id, help="accepted Partner ID")
    p.add_argument("--access-ttl", type=_duration_arg, default=ACCESS_TTL, metavar="DURATION",
                   help="access-token lifetime (seconds or 30s/5m/48h; default 48h)")
    p.add_argument("--refresh-ttl", type=_duration_arg, default=REFRESH_TTL, metavar="DURATION",
                   help="refresh-token lifetime (default 14d)")
    p.add_argument("--rotate-refresh", action=argparse.BooleanOptionalAction, default=True,
                   help="issue a new refresh token on every refresh (default on)")
    p.add_argument("--single-token", action=argparse.BooleanOptionalAction, default=False,
                   help="one live access token per credential (default off)")
    p.add_argument("--partners", type=int, default=partners, choices=range(1, 10), metavar="N",
                   help=f"accept N partners (default {partners}): the first from the options "
                        "above, "
                        "partner n from sandbox-app-key-n, sandbox-app-secret-n, "
                        "sandbox-partner-n; each has its own bookings")


def _sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(app_key=args.app_key, app_secret=args.app_secret,
                         partner_id=args.partner_id, access_ttl=args.access_ttl,
                         refresh_ttl=args.refresh_ttl, rotate_refresh=args.rotate_refresh,
                         single_token=args.single_token,
                         more_partners=tuple(numbered_partner(n)
                                             for n in range(2, args.partners + 1)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repairy-gateway",
        description="Credential-injecting gateway for the Repairy Partner API.")
    parser.add_argument("--version", action="version", version=f"repairy-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    raw = argparse.RawDescriptionHelpFormatter
    sb = sub.add_parser("sandbox", help="run the built-in Repairy sandbox (a fake Repairy API)",
                        formatter_class=raw, epilog="The sandbox reads no settings: only the "
                        "options above. Gateway settings: docs/settings.md.")
    sb.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sb.add_argument("--port", type=int, default=8090,
                    help="port (default 8090; 0 picks a free one)")
    _add_sandbox_options(sb)

    serve = sub.add_parser("serve", help="run the gateway (settings from the environment)",
                           formatter_class=raw, epilog=_settings_epilog(
                               "An unknown GATEWAY_*/REPAIRY_* variable is logged as a warning."))
    serve.add_argument("--config", help="TOML config file (overrides GATEWAY_CONFIG)")

    check = sub.add_parser("check", help="validate settings and log in once; print the expiry",
                           formatter_class=raw, epilog=_settings_epilog(
                               "Exit 2 on an invalid setting or an unknown GATEWAY_*/REPAIRY_* "
                               "variable, 1 if the login or the probe fails."))
    check.add_argument("--config", help="TOML config file (overrides GATEWAY_CONFIG)")

    config = sub.add_parser("config", help="print the effective settings and where each came "
                            "from (secrets redacted)", formatter_class=raw,
                            epilog=_settings_epilog("Validates like serve (exit 2 if invalid); "
                                                    "makes no connection."))
    config.add_argument("--config", help="TOML config file (overrides GATEWAY_CONFIG)")

    demo = sub.add_parser("demo", help="run the sandbox and the gateway together on loopback",
                          formatter_class=raw, epilog=_settings_epilog(
                              "The gateway's listeners come from the options above; "
                              "the other settings from the environment."))
    demo.add_argument("--listen", default="127.0.0.1:8080",
                      help="gateway proxy listener (default 127.0.0.1:8080; port 0 = any)")
    demo.add_argument("--admin-listen", default="127.0.0.1:9091",
                      help="gateway admin listener (default 127.0.0.1:9091; port 0 = any)")
    demo.add_argument("--sandbox-port", type=int, default=0,
                      help="sandbox port (default: any free port)")
    demo.add_argument("--once", action="store_true",
                      help="make the sample request, print it, and exit")
    _add_sandbox_options(demo, partners=2)  # the demo shows two credential profiles
    return parser


def _print(line: str) -> None:
    print(line, flush=True)


def _announce_sandbox(config: SandboxConfig) -> Callable[[str], None]:
    def announce(url: str) -> None:
        secret = config.app_secret if config.app_secret == DEFAULT_APP_SECRET else "(as given)"
        _print(f"repairy sandbox listening on {url}")
        _print(f"  app key: {config.app_key}  app secret: {secret}  "
               f"partner id: {config.partner_id}")
        _print(f"  access ttl: {config.access_ttl:.10g}s  refresh ttl: {config.refresh_ttl:.10g}s  "
               f"rotation: {config.rotate_refresh}  single token: {config.single_token}")
        for more in config.more_partners:
            _print(f"  app key: {more.app_key}  app secret: {more.app_secret}  "
                   f"partner id: {more.partner_id}")

    return announce


def run_until_signalled(coro: Coroutine[Any, Any, int | None]) -> int:
    """Run ``coro``; SIGINT/SIGTERM cancel it unless it installs its own handlers."""

    async def runner() -> int | None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await coro
        except asyncio.CancelledError:
            return 0

    return asyncio.run(runner()) or 0


def _setup_logging(level: str, fmt: str) -> None:
    from gateway.logs import setup_logging

    setup_logging(level, fmt)


def _warn_unknown_variables() -> None:
    """A mistyped GATEWAY_*/REPAIRY_* variable would be silently ignored: say so."""
    import logging

    for name, close in unknown_variables(os.environ):
        hint = f"; did you mean {close}?" if close else ""
        logging.getLogger("gateway.settings").warning(
            "%s is not a setting of repairy-gateway: ignored%s", name, hint,
            extra={"fields": {"event": "unknown_setting", "variable": name,
                              "did_you_mean": close}})


def _strict_settings(config_file: str | None) -> Settings:
    """The settings, where an unknown GATEWAY_*/REPAIRY_* variable is an error too (every
    problem at once). Kubernetes service-link variables are not settings, nor errors."""
    unknown = [(name, "not a setting of repairy-gateway" + (
        f"; did you mean {close}?" if close else "")) for name, close in
        unknown_variables(os.environ)]
    try:
        settings = load_settings(config_file=config_file)
    except SettingsError as exc:
        raise SettingsError(exc.setting, exc.problem, [*exc.problems[1:], *unknown]) from None
    if unknown:
        raise SettingsError(*unknown[0], more=unknown[1:])
    return settings


def _log_format() -> str:
    """GATEWAY_LOG_FORMAT alone (the demo takes no other setting before it starts)."""
    spec = next(spec for spec in SPECS if spec.env == "GATEWAY_LOG_FORMAT")
    raw = os.environ.get(spec.env) or spec.default
    try:
        return str(spec.parse(raw))
    except ValueError as exc:
        raise SettingsError(spec.env, str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sandbox":
            config = _sandbox_config(args)

            async def sandbox() -> int:
                await serve_forever(config, args.host, args.port, _announce_sandbox(config))
                return 0

            return run_until_signalled(sandbox())
        if args.command == "serve":
            from gateway.app import serve
            from gateway.event_loop import run
            from gateway.logs import setup_audit

            settings = load_settings(config_file=args.config)
            _setup_logging(settings.log.log_level, settings.log.log_format)
            setup_audit(settings.log.audit_log)
            _warn_unknown_variables()
            return run(serve(settings), settings.server.event_loop)
        if args.command == "check":
            from gateway.commands import check

            settings = _strict_settings(args.config)
            _setup_logging("warning", settings.log.log_format)
            return asyncio.run(check(settings, _print))
        if args.command == "config":
            from gateway.settings_docs import render_effective

            settings = load_settings(config_file=args.config)
            sys.stdout.write(render_effective(settings, unknown_variables(os.environ)))
            return 0
        if args.command == "demo":
            from gateway.commands import demo

            _setup_logging("info", _log_format())
            return asyncio.run(demo(_sandbox_config(args), args.listen, args.admin_listen,
                                    args.sandbox_port, args.once, _print))
    except SettingsError as exc:
        for name, why in exc.problems:  # every bad setting, one line each
            print(f"repairy-gateway: invalid setting {name}: {why}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"repairy-gateway: {exc}", file=sys.stderr)
        return 1
    return 0
