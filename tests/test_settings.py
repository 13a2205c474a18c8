"""Settings: sources, precedence, *_FILE secrets, validation naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config_values import TcpAddress, UnixAddress
from gateway.settings import (
    SPECS,
    SettingsError,
    load_settings,
)
from gateway.settings_docs import render_example_config, render_settings_table

CATEGORY = "unit"  # unit, integration or system: tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
BASE = {"REPAIRY_BASE_URL": "https://api.example.test/v1/", "REPAIRY_APP_KEY": "key-1",
        "REPAIRY_APP_SECRET": "secret-1", "REPAIRY_PARTNER_ID": "partner-1"}


def test_settings_defaults_match_documentation() -> None:
    """With only the required values, every other setting takes its documented default."""
    s = load_settings(BASE)
    assert str(s.partner.base_url) == "https://api.example.test/v1/"
    assert s.proxy.listen == TcpAddress("127.0.0.1", 8080)
    assert s.server.admin_listen == TcpAddress("127.0.0.1", 9091)
    assert (s.auth.auth_token_path, s.auth.auth_refresh_path) == ("/auth/token", "/auth/refresh")
    auth = s.auth
    assert (auth.auth_app_key_field, auth.auth_refresh_token_field) == ("appKey", "refreshToken")
    assert s.auth.access_token_default_ttl == 48 * 3600
    assert s.auth.refresh_token_default_ttl == 14 * 86400
    assert s.proxy.replay_body_limit == 64 * 1024
    assert s.upstream.keepalive_timeout == 4.0  # below Node's 5 s upstream idle timeout
    g = s.guards
    assert (g.retry_attempts, g.retry_on_status) == (2, frozenset())
    assert s.upstream.total_timeout == 300.0
    assert (g.retry_budget_ratio, g.retry_budget_min_per_second) == (0.2, 10.0)
    assert (g.breaker_failures, g.breaker_failure_ratio, g.breaker_cooldown) == (20, 0.5, 10.0)
    assert (g.upstream_concurrency, g.rate_limit, g.client_rate_limit) == (0, 0.0, 0.0)


@pytest.mark.parametrize(("env", "value", "problem"), [
    ("GATEWAY_RETRY_ON_STATUS", "503,abc", "not an HTTP error status"),
    ("GATEWAY_RETRY_ON_STATUS", "401", "401 is the token's business"),
    ("GATEWAY_RETRY_ATTEMPTS", "0", "from 1 to 10"),
    ("GATEWAY_RETRY_BUDGET_RATIO", "1.5", "from 0 to 1"),
    ("GATEWAY_UPSTREAM_CONCURRENCY", "500", "must not exceed GATEWAY_POOL_SIZE"),
    ("GATEWAY_RETRY_BACKOFF_MIN", "5s", "must not exceed GATEWAY_RETRY_BACKOFF_MAX"),
    ("GATEWAY_RATE_LIMIT", "nan", "number"),
])
def test_settings_retry_and_limit_values_are_checked(env: str, value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, env: value})
    assert err.value.setting == env
    assert problem in str(err.value)


def test_settings_retry_on_status_is_a_set_of_codes() -> None:
    s = load_settings({**BASE, "GATEWAY_RETRY_ON_STATUS": " 502, 503 ,504,429,"})
    assert s.guards.retry_on_status == frozenset({502, 503, 504, 429})


def test_settings_environment_overrides_file(tmp_path: Path) -> None:
    """GATEWAY_CONFIG's TOML is read; the environment wins over it."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nread_timeout = "5s"\nlog_format = "text"\n'
                   'listen = "unix:/run/gw.sock"\n')
    s = load_settings({**BASE, "GATEWAY_CONFIG": str(cfg), "GATEWAY_LOG_FORMAT": "json"})
    assert s.upstream.read_timeout == 5.0
    assert s.log.log_format == "json"
    assert s.proxy.listen == UnixAddress("/run/gw.sock")


def test_settings_secrets_from_files_strip_trailing_newline(tmp_path: Path) -> None:
    """REPAIRY_*_FILE read a mounted secret; the trailing newline is dropped."""
    env = {"REPAIRY_BASE_URL": "https://x.test"}
    for name, value in (("APP_KEY", "k"), ("APP_SECRET", "s3cret"), ("PARTNER_ID", "p")):
        f = tmp_path / name
        f.write_text(value + "\n")
        env[f"REPAIRY_{name}_FILE"] = str(f)
    s = load_settings(env)
    assert s.partner.app_secret.reveal() == "s3cret"
    assert s.partner.partner_id == "p"


def test_settings_repr_never_shows_secrets() -> None:
    """repr(Settings) shows fingerprints, not the App Key or Secret."""
    text = repr(load_settings(BASE))
    assert "secret-1" not in text and "key-1" not in text
    assert "Secret(fp=" in text


@pytest.mark.parametrize(("env", "named"), [
    ({"REPAIRY_BASE_URL": ""}, "REPAIRY_BASE_URL"),
    ({"REPAIRY_BASE_URL": "ftp://x"}, "REPAIRY_BASE_URL"),
    ({"REPAIRY_BASE_URL": "https://x/?q=1"}, "REPAIRY_BASE_URL"),
    ({"REPAIRY_APP_SECRET": ""}, "REPAIRY_APP_SECRET"),
    ({"GATEWAY_LISTEN": "localhost"}, "GATEWAY_LISTEN"),
    ({"GATEWAY_LISTEN": "127.0.0.1:99999"}, "GATEWAY_LISTEN"),
    ({"GATEWAY_ADMIN_LISTEN": "unix:/x"}, "GATEWAY_ADMIN_LISTEN"),
    ({"GATEWAY_READ_TIMEOUT": "soon"}, "GATEWAY_READ_TIMEOUT"),
    ({"GATEWAY_MAX_BODY_SIZE": "lots"}, "GATEWAY_MAX_BODY_SIZE"),
    ({"GATEWAY_RENEW_AT_FRACTION": "1.5"}, "GATEWAY_RENEW_AT_FRACTION"),
    ({"GATEWAY_LOG_LEVEL": "chatty"}, "GATEWAY_LOG_LEVEL"),
    ({"REPAIRY_AUTH_TOKEN_PATH": "auth/token"}, "REPAIRY_AUTH_TOKEN_PATH"),
    ({"REPAIRY_AUTH_REFRESH_BEARER": "maybe"}, "REPAIRY_AUTH_REFRESH_BEARER"),
    ({"GATEWAY_RENEW_RETRY_MIN": "2m", "GATEWAY_RENEW_RETRY_MAX": "1m"},
     "GATEWAY_RENEW_RETRY_MIN"),
    ({"GATEWAY_REPLAY_BODY_LIMIT": "2MiB", "GATEWAY_MAX_BODY_SIZE": "1MiB"},
     "GATEWAY_REPLAY_BODY_LIMIT"),
    ({"REPAIRY_APP_SECRET_FILE": "/nonexistent/secret"}, "REPAIRY_APP_SECRET_FILE"),
    ({"GATEWAY_RENEW_AT_FRACTION": "0"}, "GATEWAY_RENEW_AT_FRACTION"),
    ({"GATEWAY_RENEW_AT_FRACTION": "0.05"}, "GATEWAY_RENEW_AT_FRACTION"),
    ({"GATEWAY_RENEW_AT_FRACTION": "0.99"}, "GATEWAY_RENEW_AT_FRACTION"),
    ({"GATEWAY_RENEW_AT_FRACTION": "nan"}, "GATEWAY_RENEW_AT_FRACTION"),
    ({"GATEWAY_RENEW_JITTER_FRACTION": "0.97"}, "GATEWAY_RENEW_JITTER_FRACTION"),
    ({"GATEWAY_RENEW_AT_FRACTION": "0.3", "GATEWAY_RENEW_JITTER_FRACTION": "0.3"},
     "GATEWAY_RENEW_JITTER_FRACTION"),
    ({"GATEWAY_RENEW_RETRY_MIN": "0"}, "GATEWAY_RENEW_RETRY_MIN"),
    ({"GATEWAY_RENEW_RETRY_MAX": "0s"}, "GATEWAY_RENEW_RETRY_MAX"),
    ({"GATEWAY_LOGIN_RETRY_INTERVAL": "0"}, "GATEWAY_LOGIN_RETRY_INTERVAL"),
    ({"GATEWAY_AUTH_TIMEOUT": "0"}, "GATEWAY_AUTH_TIMEOUT"),
    ({"GATEWAY_CONNECT_TIMEOUT": "0ms"}, "GATEWAY_CONNECT_TIMEOUT"),
    ({"GATEWAY_TOKEN_WAIT_TIMEOUT": "0"}, "GATEWAY_TOKEN_WAIT_TIMEOUT"),
    ({"REPAIRY_ACCESS_TOKEN_TTL": "0"}, "REPAIRY_ACCESS_TOKEN_TTL"),
    ({"REPAIRY_REFRESH_TOKEN_TTL": "0"}, "REPAIRY_REFRESH_TOKEN_TTL"),
    ({"GATEWAY_PERSISTENT_401_COOLDOWN": "2h"}, "GATEWAY_PERSISTENT_401_COOLDOWN"),
    ({"GATEWAY_TOKEN_WAIT_TIMEOUT": "9" * 400}, "GATEWAY_TOKEN_WAIT_TIMEOUT"),
    ({"GATEWAY_RENEW_RETRY_MAX": "20000d"}, "GATEWAY_RENEW_RETRY_MAX"),
    ({"GATEWAY_HEADER_TIMEOUT": "0"}, "GATEWAY_HEADER_TIMEOUT"),
    ({"GATEWAY_CLIENT_BODY_TIMEOUT": "0s"}, "GATEWAY_CLIENT_BODY_TIMEOUT"),
])
def test_settings_invalid_value_names_the_setting(env: dict[str, str], named: str) -> None:
    """A bad value fails with one line naming the setting (and no secret in it)."""
    merged = {**BASE, **env}
    if "REPAIRY_APP_SECRET_FILE" in env:
        del merged["REPAIRY_APP_SECRET"]
    with pytest.raises(SettingsError) as info:
        load_settings(merged)
    assert info.value.setting == named
    assert "\n" not in str(info.value)
    assert "secret-1" not in str(info.value)


@pytest.mark.parametrize("line", ["token_wait_timeout = nan", "renew_retry_max = inf",
                                  "auth_timeout = -1.0", "renew_at_fraction = nan"])
def test_settings_non_finite_values_in_the_file_are_refused(tmp_path: Path, line: str) -> None:
    """TOML floats nan and inf (and negatives) are refused by name, never used."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f"[gateway]\n{line}\n")
    with pytest.raises(SettingsError, match=line.split()[0]):
        load_settings({**BASE, "GATEWAY_CONFIG": str(cfg)})


def test_settings_small_durations_stay_valid() -> None:
    """Tests and short-lived tokens need small values: 1-4 s timeouts, retry maxima, polls."""
    s = load_settings({**BASE, "GATEWAY_AUTH_TIMEOUT": "1s", "GATEWAY_RENEW_RETRY_MIN": "250ms",
                       "GATEWAY_RENEW_RETRY_MAX": "4s", "GATEWAY_LOGIN_RETRY_INTERVAL": "1s",
                       "GATEWAY_SECRETS_POLL_INTERVAL": "1s", "GATEWAY_CONNECT_TIMEOUT": "1s",
                       "GATEWAY_RENEW_AT_FRACTION": "0.1", "GATEWAY_RENEW_JITTER_FRACTION": "0",
                       "REPAIRY_ACCESS_TOKEN_TTL": "2s"})
    t = s.token
    assert (s.auth.auth_timeout, t.renew_retry_min, t.renew_retry_max) == (1.0, 0.25, 4.0)
    assert (s.token.renew_at_fraction, s.token.renew_jitter_fraction) == (0.1, 0.0)


def test_settings_missing_required_and_conflicting_sources() -> None:
    """Missing credentials name the variable; setting both X and X_FILE is refused."""
    with pytest.raises(SettingsError, match="REPAIRY_PARTNER_ID"):
        load_settings({k: v for k, v in BASE.items() if k != "REPAIRY_PARTNER_ID"})
    with pytest.raises(SettingsError, match="not both"):
        load_settings({**BASE, "REPAIRY_APP_KEY_FILE": "/x"})


def test_settings_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    """Unknown keys and bad values in the file are named with the file path."""
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nread_timout = "5s"\n')
    with pytest.raises(SettingsError, match="read_timout"):
        load_settings({**BASE, "GATEWAY_CONFIG": str(cfg)})
    cfg.write_text('[gateway]\nread_timeout = "forever"\n')
    with pytest.raises(SettingsError, match=r"read_timeout \(in .*gw.toml\)"):
        load_settings({**BASE, "GATEWAY_CONFIG": str(cfg)})
    cfg.write_text("not = [toml")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings({**BASE, "GATEWAY_CONFIG": str(cfg)})


def test_settings_example_config_lists_every_setting_and_loads() -> None:
    """config/repairy-gateway.toml is current, names every setting, and parses as TOML."""
    example = ROOT / "config" / "repairy-gateway.toml"
    assert example.read_text() == render_example_config()
    for spec in SPECS:
        assert f"# {spec.key} = " in example.read_text()
    load_settings({**BASE, "GATEWAY_CONFIG": str(example)})  # all commented: still valid


def test_settings_docs_table_lists_every_setting() -> None:
    """docs/settings.md's table is the one generated from the settings declarations."""
    readme = (ROOT / "docs" / "settings.md").read_text()
    assert render_settings_table() in readme
    assert all(f"`{s.env}`" in readme for s in SPECS)


#: Every duration that bounds another, with its floor (issue 20, part 3).
FLOORS = {"GATEWAY_REDIS_LEASE_TTL": "1s", "GATEWAY_RENEW_RETRY_MIN": "50ms",
          "GATEWAY_RENEW_RETRY_MAX": "500ms", "GATEWAY_LOGIN_RETRY_INTERVAL": "50ms",
          "GATEWAY_SECRETS_POLL_INTERVAL": "50ms", "GATEWAY_AUTH_TIMEOUT": "100ms",
          "GATEWAY_TOKEN_WAIT_TIMEOUT": "100ms", "GATEWAY_CONNECT_TIMEOUT": "50ms",
          "GATEWAY_RETRY_BACKOFF_MIN": "10ms", "GATEWAY_RETRY_BUDGET_WINDOW": "1s",
          "GATEWAY_BREAKER_WINDOW": "1s", "GATEWAY_BREAKER_COOLDOWN": "100ms",
          "GATEWAY_PERSISTENT_401_COOLDOWN": "1s", "GATEWAY_READ_TIMEOUT": "100ms",
          "GATEWAY_TOTAL_TIMEOUT": "100ms", "GATEWAY_HEADER_TIMEOUT": "100ms",
          "GATEWAY_CLIENT_BODY_TIMEOUT": "100ms", "REPAIRY_ACCESS_TOKEN_TTL": "1s",
          "REPAIRY_REFRESH_TOKEN_TTL": "1s"}


@pytest.mark.parametrize("env", sorted(FLOORS))
def test_settings_durations_that_bound_others_have_floors(env: str) -> None:
    """1 ms below the floor is refused naming the setting and the floor; the floor itself is
    taken; the floor is in the documented meaning (docs/settings.md is rendered from it)."""
    floor = FLOORS[env]
    seconds = float(floor[:-2]) / 1000 if floor.endswith("ms") else float(floor[:-1])
    extra = {"GATEWAY_REDIS_URL": "redis://127.0.0.1:6379"} if "REDIS" in env else {}
    if env == "GATEWAY_RENEW_RETRY_MAX":
        extra["GATEWAY_RENEW_RETRY_MIN"] = "50ms"
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, **extra, env: f"{seconds * 1000 - 1:g}ms"})
    assert err.value.setting == env and f"at least {floor}" in err.value.problem
    load_settings({**BASE, **extra, env: floor})
    spec = next(s for s in SPECS if s.env == env)
    assert f"At least {floor}." in spec.doc


def test_settings_a_poll_interval_of_zero_stays_off() -> None:
    s = load_settings({**BASE, "GATEWAY_SECRETS_POLL_INTERVAL": "0"})
    assert s.server.secrets_poll_interval == 0


@pytest.mark.unit
def test_settings_the_contention_window_must_outlast_the_spaced_logins() -> None:
    """While contention lasts logins come GATEWAY_LOGIN_RETRY_INTERVAL apart: a window of
    two intervals or less could never see it last."""
    with pytest.raises(SettingsError) as caught:
        load_settings({**BASE, "GATEWAY_LOGIN_RETRY_INTERVAL": "5m",
                       "GATEWAY_CONTENTION_WINDOW": "10m"})
    assert caught.value.setting == "GATEWAY_CONTENTION_WINDOW"
    load_settings({**BASE, "GATEWAY_LOGIN_RETRY_INTERVAL": "30s",
                   "GATEWAY_CONTENTION_WINDOW": "61s"})
