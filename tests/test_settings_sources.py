"""Each setting declared once; where values come from (``repairy-gateway config``); typos in
the file; cross-field problems all at once; ``GATEWAY_LOG_FORMAT=auto``."""

from __future__ import annotations

import io
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from gateway.env_names import unknown_variables
from gateway.logs import JsonFormatter, TextFormatter, setup_logging
from gateway.settings import SPECS, Settings, SettingsError, load_settings
from gateway.settings_docs import render_effective

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

BASE = {"REPAIRY_BASE_URL": "https://api.test", "REPAIRY_APP_KEY": "key-value-1234",
        "REPAIRY_APP_SECRET": "secret-value-5678", "REPAIRY_PARTNER_ID": "p1"}


def test_sources_every_setting_is_one_field_of_one_component_config() -> None:
    """The declarations are the configs' fields: no setting without a field, no field of a
    component config that is not a setting, no name twice."""
    s = load_settings(BASE)
    declared = [spec.key for spec in SPECS]
    assert len(declared) == len(set(declared))
    assert len({spec.env for spec in SPECS}) == len(SPECS)
    component_fields = [f.name for group in fields(Settings) if group.name not in (
        "config_file", "secret_files", "sources", "more_profiles")
        for f in fields(getattr(s, group.name))]
    assert sorted(component_fields) == sorted(declared)
    for spec in SPECS:
        assert s.value(spec.key) is not None or spec.default in ("", None)


def test_sources_a_file_typo_gets_did_you_mean_and_all_are_reported(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nread_timeot = "30s"\npool_sise = 10\nzzz = 1\n')
    with pytest.raises(SettingsError) as info:
        load_settings(BASE, config_file=str(config))
    problems = dict(info.value.problems)
    assert problems[f"read_timeot (in {config})"].endswith("did you mean read_timeout?")
    assert problems[f"pool_sise (in {config})"].endswith("did you mean pool_size?")
    assert problems[f"zzz (in {config})"] == "unknown setting"


def test_sources_cross_field_problems_are_reported_all_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(BASE | {"GATEWAY_RENEW_RETRY_MIN": "10s", "GATEWAY_RENEW_RETRY_MAX": "5s",
                              "GATEWAY_RETRY_BACKOFF_MIN": "3s",
                              "GATEWAY_RETRY_BACKOFF_MAX": "1s",
                              "GATEWAY_CACHE_SHARED": "true"})
    named = [name for name, _ in info.value.problems]
    assert named == ["GATEWAY_RENEW_RETRY_MIN", "GATEWAY_CACHE_SHARED",
                     "GATEWAY_RETRY_BACKOFF_MIN"]


def test_sources_service_link_variables_are_never_unknown_settings() -> None:
    """Kubernetes sets these for every Service in the namespace (a Service named "gateway"
    gives GATEWAY_SERVICE_HOST): not typos of ours."""
    url = "tcp://10.0.0.1:8080"
    env = {"GATEWAY_SERVICE_HOST": "10.0.0.1", "GATEWAY_SERVICE_PORT": "8080",
           "GATEWAY_SERVICE_PORT_HTTP": "8080", "GATEWAY_PORT": url,
           "GATEWAY_PORT_8080_TCP": url, "GATEWAY_PORT_8080_TCP_PROTO": "tcp",
           "GATEWAY_PORT_8080_TCP_PORT": "8080", "GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1",
           "GATEWAY_PORT_53_UDP_ADDR": "10.0.0.2", "GATEWAY_PORT_9_SCTP": "sctp://10.0.0.3:9",
           "REPAIRY_API_SERVICE_HOST": "10.0.0.4", "REPAIRY_API_PORT_443_TCP": "tcp://10.0.0.4:443"}
    assert unknown_variables(env) == []
    assert unknown_variables({"GATEWAY_PORTS": "1", "GATEWAY_PORT_X": "1"}) == [
        ("GATEWAY_PORTS", None), ("GATEWAY_PORT_X", None)]


def test_sources_config_report_says_where_each_value_came_from(tmp_path: Path) -> None:
    """Every setting, with its origin: default, the file, the environment, a *_FILE; a
    secret only as a fingerprint, wherever it came from."""
    secret = tmp_path / "app-secret"
    secret.write_text("file-secret-value-9999\n")
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nread_timeout = "30s"\nclient_keys = "ops=client-key-ops-1"\n'
                      'listen = "0.0.0.0:8080"\n')
    env = {k: v for k, v in BASE.items() if k != "REPAIRY_APP_SECRET"} | {
        "REPAIRY_APP_SECRET_FILE": str(secret), "GATEWAY_POOL_SIZE": "7"}
    report = render_effective(load_settings(env, config_file=str(config)),
                              [("GATEWAY_RETRY_ATTEMPT", "GATEWAY_RETRY_ATTEMPTS")])
    lines = {line.split(" = ")[0]: line for line in report.splitlines() if " = " in line}
    assert len(lines) == len(SPECS)
    fed_back = tmp_path / "fed-back.toml"
    fed_back.write_text(report)
    with pytest.raises(SettingsError) as info:  # no credential from a redaction
        load_settings({}, config_file=str(fed_back))
    assert "REPAIRY_APP_KEY" in [name for name, _ in info.value.problems]
    assert lines["read_timeout"] == f'read_timeout = "30s"  # file {config}'
    assert lines["pool_size"] == 'pool_size = "7"  # environment GATEWAY_POOL_SIZE'
    assert lines["connect_timeout"] == 'connect_timeout = "5s"  # default'
    assert lines["# app_secret"].endswith(f"# REPAIRY_APP_SECRET_FILE {secret}")
    # Secrets are commented out (fed back, the file sets none); a fingerprint only for the
    # App Key and store keys, never for what may be a weak password.
    assert lines["# app_key"].startswith('# app_key = "<redacted fp:')
    assert lines["# app_secret"].startswith('# app_secret = "<redacted>"')
    assert lines["# client_keys"].startswith('# client_keys = "<redacted>"')
    for secret_text in ("file-secret-value", "key-value-1234", "client-key-ops-1"):
        assert secret_text not in report
    assert "GATEWAY_RETRY_ATTEMPT (did you mean GATEWAY_RETRY_ATTEMPTS?)" in report
    assert f"(config file: {config})" in report


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "fmt", "expected"), [
    (_Terminal(), "auto", TextFormatter), (io.StringIO(), "auto", JsonFormatter),
    (_Terminal(), "json", JsonFormatter), (io.StringIO(), "text", TextFormatter)])
def test_sources_log_format_auto_is_text_on_a_terminal_and_json_otherwise(
        stream: Any, fmt: str, expected: type) -> None:
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        handler = setup_logging("info", fmt, stream)
        assert isinstance(handler.formatter, expected)
    finally:
        for h in root.handlers:
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)
    assert load_settings(BASE).log.log_format == "auto"


def test_sources_a_typo_that_looks_like_a_service_link_is_still_reported() -> None:
    """The name's shape is not enough: a Service link's value is an address, a port number
    or a protocol. GATEWAY_ADMIN_PORT=9091 is a typo (the gateway has no port setting);
    tcp://10.0.0.7:9091 is the link of a Service named gateway-admin."""
    typos = {"GATEWAY_ADMIN_PORT": "9091", "GATEWAY_LISTEN_PORT": "8080",
             "GATEWAY_PORT": "8080", "REPAIRY_SERVICE_HOST": "api.repairy.test",
             "GATEWAY_PORT_8080_TCP_PROTO": "http", "GATEWAY_SERVICE_PORT": "http"}
    assert [name for name, _ in unknown_variables(typos)] == sorted(typos)
    links = {"GATEWAY_ADMIN_PORT": "tcp://10.0.0.7:9091", "GATEWAY_PORT": "tcp://[fd00::1]:80",
             "GATEWAY_SERVICE_HOST": "fd00::1", "GATEWAY_PORT_8080_TCP_PROTO": "tcp",
             "GATEWAY_SERVICE_PORT": "8080"}
    assert unknown_variables(links) == []


def test_sources_a_service_named_like_a_suffix_is_still_a_link() -> None:
    """Kubernetes' own variables for Services named gateway-service and repairy-service:
    GATEWAY_SERVICE_PORT is then a URL, not a port number (review finding)."""
    for svc in ("GATEWAY_SERVICE", "REPAIRY_SERVICE", "GATEWAY_ADMIN", "GATEWAY"):
        env = {f"{svc}_SERVICE_HOST": "10.0.0.9", f"{svc}_SERVICE_PORT": "80",
               f"{svc}_SERVICE_PORT_HTTP": "80", f"{svc}_PORT": "tcp://10.0.0.9:80",
               f"{svc}_PORT_80_TCP": "tcp://10.0.0.9:80", f"{svc}_PORT_80_TCP_PROTO": "tcp",
               f"{svc}_PORT_80_TCP_PORT": "80", f"{svc}_PORT_80_TCP_ADDR": "10.0.0.9"}
        assert unknown_variables(env) == [], svc


@pytest.mark.parametrize("url", ["redis://r:6379/0?password=querypw",
                                 "rediss://r:6379/0?username=u&password=p",
                                 "redis://:pw@r:6379/0"])
def test_sources_a_redis_password_never_rides_in_the_url(url: str) -> None:
    """redis-py takes a password from the URL's query too: refused like one in its userinfo,
    so that neither the config report nor a log line can carry it (review finding)."""
    for env in ("GATEWAY_REDIS_URL", "GATEWAY_CACHE_REDIS_URL"):
        with pytest.raises(SettingsError) as info:
            load_settings(BASE | {env: url, "GATEWAY_CACHE_SHARED": "true"})
        assert "querypw" not in str(info.value) and ":pw@" not in str(info.value)
        assert env in [name for name, _ in info.value.problems]


def test_sources_a_file_typo_and_bad_variables_are_reported_together(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nread_timeot = "30s"\n')
    with pytest.raises(SettingsError) as info:
        load_settings({"GATEWAY_WORKERS": "abc"}, config_file=str(config))
    named = [name for name, _ in info.value.problems]
    assert named[0] == f"read_timeot (in {config})"
    assert "REPAIRY_BASE_URL" in named and "GATEWAY_WORKERS" in named


def test_sources_the_config_report_is_valid_toml_whatever_the_values_hold(
        tmp_path: Path) -> None:
    import tomllib

    odd = tmp_path / "a\nb \"c\" \\d"
    odd.mkdir()
    config = odd / "gateway.toml"
    config.write_text("[gateway]\n")
    env = BASE | {"REPAIRY_AUTH_APP_KEY_FIELD": "a\x7fb\"c\\\u00e9\udc80",
                  "GATEWAY_METRICS_X\n": "1"}
    report = render_effective(load_settings(env, config_file=str(config)),
                              [("GATEWAY_ODD\nNAME", None)])
    table = tomllib.loads(report)["gateway"]
    assert table["auth_app_key_field"].startswith("a\x7fb\"c\\\u00e9")
    assert len(table) == len(SPECS) - sum(1 for spec in SPECS if spec.secret
                                          and load_settings(env).value(spec.key))
