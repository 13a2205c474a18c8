"""Credential profiles: where they come from (file tables, the environment, ``*_FILE``), every
problem reported at once, the client grants, and the choice of a profile per request."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.env_names import unknown_variables
from gateway.errors import CredentialNotAllowed, UnknownCredential
from gateway.proxy.access import parse_client_profiles
from gateway.proxy.lanes import Lane, Lanes
from gateway.settings import SettingsError, load_settings

CATEGORY = "unit"

BASE = {"REPAIRY_BASE_URL": "https://api.example.test/", "REPAIRY_APP_KEY": "key-1",
        "REPAIRY_APP_SECRET": "secret-1", "REPAIRY_PARTNER_ID": "partner-1"}
EU = {"GATEWAY_PROFILES": "eu", "REPAIRY_PROFILE_EU_APP_KEY": "key-eu",
      "REPAIRY_PROFILE_EU_APP_SECRET": "secret-eu", "REPAIRY_PROFILE_EU_PARTNER_ID": "p-eu"}


def test_profiles_default_alone_is_the_repairy_settings() -> None:
    s = load_settings(BASE)
    assert [p.name for p in s.profiles] == ["default"]
    (default,) = s.profiles
    assert default.required and default.partner == s.partner
    assert default.side.owner == s.token_side().owner  # the fleet's entry is unchanged


def test_profiles_from_the_environment_inherit_what_they_do_not_set() -> None:
    s = load_settings({**BASE, **EU, "REPAIRY_PROFILE_EU_AUTH_TOKEN_PATH": "/v2/auth/token",
                       "REPAIRY_PROFILE_EU_REQUIRED": "true"})
    default, eu = s.profiles
    assert eu.name == "eu" and eu.required and not eu.is_default
    assert eu.partner.partner_id == "p-eu" and eu.partner.app_key.reveal() == "key-eu"
    assert eu.partner.base_url == default.partner.base_url  # optional: the default's
    assert eu.side.auth.auth_token_path == "/v2/auth/token"
    assert eu.side.auth.auth_refresh_path == "/auth/refresh"
    assert eu.side.owner != default.side.owner
    # Both profiles' auth paths are refused on the proxy listener.
    assert set(s.request_path().auth_paths) == {"/auth/token", "/auth/refresh",
                                                "/v2/auth/token"}


def test_profiles_from_file_tables_and_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "au-secret"
    secret.write_text("secret-au\n")
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nlog_level = "info"\n\n'
                      '[profiles.au]\nbase_url = "https://au.example.test/"\n'
                      'app_key = "key-au"\npartner_id = "p-au"\n')
    s = load_settings({**BASE, "REPAIRY_PROFILE_AU_APP_SECRET_FILE": str(secret)},
                      config_file=str(config))
    au = s.profiles[1]
    assert str(au.partner.base_url) == "https://au.example.test/"
    assert au.partner.app_secret.reveal() == "secret-au" and not au.required
    assert ("profiles.au.app_secret", str(secret)) in s.secret_files  # watched for rotation


def test_profiles_every_problem_at_once(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[profiles.Bad]\napp_key = "k"\n[profiles.au]\napp_key = "k2"\n'
                      'colour = "blue"\n')
    env = {**BASE, **EU, "GATEWAY_PROFILES": "eu,default",
           "REPAIRY_PROFILE_EU_BASE_URL": "ftp://x", "REPAIRY_PROFILE_NZ_APP_KEY": "k3",
           "GATEWAY_CLIENT_PROFILES": "web=eu|mars"}
    with pytest.raises(SettingsError) as err:
        load_settings(env, config_file=str(config))
    named = dict(err.value.problems)
    text = str(err.value)
    assert any(k.startswith("profiles.Bad") for k in named), text
    assert "GATEWAY_PROFILES" in named  # 'default' is reserved
    assert "REPAIRY_PROFILE_EU_BASE_URL" in named
    assert "REPAIRY_PROFILE_NZ_APP_KEY" in named  # names no declared profile
    assert "REPAIRY_PROFILE_AU_APP_SECRET" in named and "REPAIRY_PROFILE_AU_PARTNER_ID" in named
    assert any("colour" in k for k in named)
    assert "secret" not in text.replace("APP_SECRET", "").replace("app_secret", "")


def test_profiles_cross_checks() -> None:
    same = {**BASE, "GATEWAY_PROFILES": "twin", "REPAIRY_PROFILE_TWIN_APP_KEY": "key-1",
            "REPAIRY_PROFILE_TWIN_APP_SECRET": "other", "REPAIRY_PROFILE_TWIN_PARTNER_ID":
            "partner-1"}
    with pytest.raises(SettingsError, match="one profile per credential"):
        load_settings(same)
    with pytest.raises(SettingsError, match="GATEWAY_CLIENT_PROFILES: needs GATEWAY_CLIENT_KEYS"):
        load_settings({**BASE, **EU, "GATEWAY_CLIENT_PROFILES": "*=eu"})
    keys = {"GATEWAY_CLIENT_KEYS": "web=client-key-web-0123456789"}
    # A grant for a client without a key (revoked from the key file, or not issued yet) is
    # no error: a revocation must never stop the next reload or start.
    load_settings({**BASE, **EU, **keys, "GATEWAY_CLIENT_PROFILES": "app=eu"})
    s = load_settings({**BASE, **EU, **keys, "GATEWAY_CLIENT_PROFILES": "web=eu|default"})
    assert s.inbound.client_profiles == (("web", ("eu", "default")),)


def test_profile_variables_are_known_names() -> None:
    env = {**BASE, **EU, "REPAIRY_PROFILE_EU_APP_SECRET_FILE": "/x",
           "REPAIRY_PROFILE_EU_APP_KEYS": "typo"}
    assert [name for name, _ in unknown_variables(env)] == ["REPAIRY_PROFILE_EU_APP_KEYS"]


@pytest.mark.parametrize("text", ["web", "web=", "web=EU", "web=eu|", "a b=eu"])
def test_client_profiles_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="client=profile"):
        parse_client_profiles(text)


def _lanes(grants: str = "") -> Lanes:
    fake: Any = object()
    return Lanes([Lane(name, fake, fake, fake, fake, fake) for name in ("default", "eu", "au")],
                 parse_client_profiles(grants))


def test_choice_without_client_keys_any_profile_and_400_for_unknown() -> None:
    lanes = _lanes()
    assert lanes.choose(None, "anonymous", False).name == "default"
    assert lanes.choose("au", "anonymous", False).name == "au"
    with pytest.raises(UnknownCredential) as err:
        lanes.choose("mars", "anonymous", False)
    assert (err.value.status, err.value.code) == (400, "unknown_credential")


def test_choice_with_client_keys_grants_and_one_answer_for_unknown_and_refused() -> None:
    lanes = _lanes("billing=eu|au, *=default|au")
    assert lanes.choose(None, "billing", True).name == "eu"  # its first: its default
    assert lanes.choose("au", "billing", True).name == "au"
    assert lanes.choose(None, "web", True).name == "default"  # the '*' grant
    assert lanes.choose("au", "web", True).name == "au"
    refusals = []
    for name, client in (("default", "billing"), ("eu", "web"), ("mars", "billing"),
                         ("mars", "web")):
        with pytest.raises(CredentialNotAllowed) as err:
            lanes.choose(name, client, True)
        refusals.append((err.value.status, err.value.code, err.value.message))
    assert len(set(refusals)) == 1 and refusals[0][:2] == (403, "credential_not_allowed")
    # Without a '*' grant, an unlisted client has the default profile only.
    plain = _lanes("billing=eu")
    assert plain.choose(None, "web", True).name == "default"
    with pytest.raises(CredentialNotAllowed):
        plain.choose("eu", "web", True)


def test_choice_costs_at_most_five_microseconds() -> None:
    """The selection function on its own (benchmarks/profile_choice.py prints the same)."""
    lanes = _lanes("billing=eu|au, *=default")
    rounds = 20_000
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            lanes.choose("au", "billing", True)
        best = min(best, (time.perf_counter() - started) / rounds)
    assert best < 5e-6, f"{best * 1e6:.2f} µs"


def test_profiles_in_the_effective_settings_without_their_secrets() -> None:
    """``repairy-gateway config`` lists each further profile as a TOML table (valid TOML),
    secrets commented out with the App Key's fingerprint only."""
    import tomllib

    from gateway.settings_docs import render_effective

    s = load_settings({**BASE, **EU, "REPAIRY_PROFILE_EU_REQUIRED": "yes"})
    text = render_effective(s)
    assert "secret-eu" not in text and "key-eu" not in text
    table = tomllib.loads(text)["profiles"]["eu"]
    assert table["partner_id"] == "p-eu" and table["required"] is True
    assert f"fp:{s.profiles[1].partner.app_key.fingerprint}" in text


def test_profiles_problems_show_with_the_default_profiles_own(tmp_path: Path) -> None:
    """An incomplete default profile does not hide the others' problems; a variable of an
    undeclared profile whose name starts with a declared one's is still reported."""
    env = {**BASE, **EU, "REPAIRY_PROFILE_EU_WEST_APP_KEY": "k", "GATEWAY_PROFILES": "eu,au"}
    del env["REPAIRY_APP_SECRET"]
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    named = dict(err.value.problems)
    assert {"REPAIRY_APP_SECRET", "REPAIRY_PROFILE_EU_WEST_APP_KEY",
            "REPAIRY_PROFILE_AU_APP_KEY", "REPAIRY_PROFILE_AU_PARTNER_ID"} <= named.keys()


@pytest.mark.parametrize(("text", "problem"), [
    ('gateway = "x"\n', "[gateway] must be a table"),
    ('profiles = "x"\n', "must hold a table per profile"),
    ('[gateway.profiles.eu]\npartner_id = "a"\n[profiles.au]\npartner_id = "b"\n',
     "both [profiles] and [gateway.profiles]"),
])
def test_profiles_file_shapes_are_errors_naming_the_file(tmp_path: Path, text: str,
                                                          problem: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    with pytest.raises(SettingsError) as err:
        load_settings(BASE, config_file=str(config))
    assert err.value.setting == "GATEWAY_CONFIG" and problem in str(err.value)


def test_profiles_plain_http_only_on_loopback() -> None:
    env = {**BASE, **EU, "REPAIRY_PROFILE_EU_BASE_URL": "http://127.0.0.2:8090/"}
    assert load_settings(env).profiles[1].partner.base_url.port == 8090
    with pytest.raises(SettingsError, match="REPAIRY_PROFILE_EU_BASE_URL: http://"):
        load_settings({**env, "REPAIRY_PROFILE_EU_BASE_URL": "http://eu.example/"})


def test_profiles_more_checks(tmp_path: Path) -> None:
    """A name given twice; the same credential behind a base URL written with a trailing
    slash; a file value that is not text; a profile whose refresh path is its login path;
    a client key pasted into the grants is never echoed."""
    slash = {**BASE, **EU, "REPAIRY_PROFILE_EU_BASE_URL": "https://api.example.test",
             "REPAIRY_PROFILE_EU_APP_KEY": "key-1", "REPAIRY_PROFILE_EU_PARTNER_ID": "partner-1"}
    with pytest.raises(SettingsError, match="one profile per credential"):
        load_settings(slash)
    with pytest.raises(SettingsError, match="'eu' is named twice"):
        load_settings({**BASE, **EU, "GATEWAY_PROFILES": "eu,eu"})
    with pytest.raises(SettingsError, match="REPAIRY_PROFILE_EU_AUTH_REFRESH_PATH: must differ"):
        load_settings({**BASE, **EU, "REPAIRY_PROFILE_EU_AUTH_REFRESH_PATH": "/auth/token"})
    config = tmp_path / "gateway.toml"
    config.write_text('[profiles.au]\napp_key = ["k"]\napp_secret = "s"\npartner_id = "p"\n')
    with pytest.raises(SettingsError, match=r"profiles\.au\.app_key .*must be a string"):
        load_settings(BASE, config_file=str(config))
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, **EU, "GATEWAY_CLIENT_KEYS": "web=client-key-web-0123456789",
                       "GATEWAY_CLIENT_PROFILES": "web=client-key-web-0123456789"})
    assert "client-key-web" not in str(err.value)


def test_profiles_a_table_named_in_gateway_profiles_is_one_profile(tmp_path: Path) -> None:
    """A profile with a table and listed in GATEWAY_PROFILES too (as the chart lists it, with
    a file from 'repairy-gateway config') is one profile; the same credential under another
    path of one upstream is refused; the default's equal auth paths are reported once; a
    cross-profile problem shows beside a single field's."""
    config = tmp_path / "gateway.toml"
    config.write_text('[profiles.eu]\npartner_id = "p-eu"\n')
    s = load_settings({**BASE, **EU}, config_file=str(config))
    assert [p.name for p in s.profiles] == ["default", "eu"]
    with pytest.raises(SettingsError, match="same upstream, App Key and Partner ID"):
        load_settings({**BASE, **EU, "REPAIRY_PROFILE_EU_BASE_URL": "https://api.example.test/v2",
                       "REPAIRY_PROFILE_EU_APP_KEY": "key-1",
                       "REPAIRY_PROFILE_EU_PARTNER_ID": "partner-1"})
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, **EU, "REPAIRY_AUTH_REFRESH_PATH": "/auth/token"})
    assert [name for name, _ in err.value.problems] == ["REPAIRY_AUTH_REFRESH_PATH"]
    token = str(tmp_path / "token.json")
    with pytest.raises(SettingsError) as err:
        load_settings({**BASE, **EU, "GATEWAY_TOKEN_FILE": token, "GATEWAY_POOL_SIZE": "x",
                       "REPAIRY_PROFILE_EU_TOKEN_FILE": token})
    assert {"GATEWAY_POOL_SIZE", "REPAIRY_PROFILE_EU_TOKEN_FILE"} <= dict(err.value.problems).keys()
