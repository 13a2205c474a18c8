"""Hot credential rotation: re-read ``*_FILE`` credentials and client keys, switch safely.

Kubernetes updates mounted secrets in place. Every ``secrets_poll_interval`` (and on SIGHUP,
which also re-reads the config file: any other changed setting is named in a warning, as it
takes effect only after a restart) the files are compared with what was last applied:

* when the App Key, App Secret or Partner ID changed, the gateway logs in with the new values
  *in the background* while the old token keeps serving, and only once that login works does
  it switch settings and token over, atomically. A login that fails leaves everything as it
  was; the same files are tried again after ``login_retry_interval`` (or on SIGHUP), new
  files at once. Rotation logins count in ``credential_reloads_total`` only, never as renewals.
* a changed ``GATEWAY_CLIENT_KEYS_FILE`` is applied on its own, without any login (a revoked
  client key must stop working promptly). An unreadable, invalid or empty file keeps the
  previous keys and logs an error: it never falls back to "no keys".
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from gateway.clock import Clock
from gateway.errors import AuthError
from gateway.logs import CREDENTIAL
from gateway.proxy.access import AccessPolicy, ClientKey, parse_client_keys
from gateway.settings import SPECS, Settings, SettingsError
from gateway.state import GatewayState
from gateway.tasks import cancel_and_wait, sleep_or_set
from gateway.token.auth_client import AuthClient
from gateway.token.config import DEFAULT_PROFILE, PartnerConfig

log = logging.getLogger("gateway.credentials")
CREDENTIAL_KEYS = ("app_key", "app_secret", "partner_id")
_PROFILE_AUTH = ("auth_token_path", "auth_refresh_path", "auth_app_key_field",
                 "auth_app_secret_field", "auth_refresh_token_field")


def _files_digest(settings: Settings) -> str:
    """A digest of the credential files (client keys are watched apart)."""
    digest = hashlib.sha256()
    for key, path in settings.secret_files:
        if key.rsplit(".", 1)[-1] not in CREDENTIAL_KEYS:  # profiles.<name>.app_key too
            continue
        digest.update(key.encode())
        try:
            digest.update(Path(path).read_bytes())
        except OSError:
            digest.update(b"\0unreadable")
    return digest.hexdigest()


def _note_restart_needed(loaded: Settings, running: Settings) -> None:
    """Say which re-read settings (the config file, the mounted files) differ from the running
    ones and only take effect after a restart: all but the credentials (applied after a
    login) and client keys kept in GATEWAY_CLIENT_KEYS_FILE (applied at once); inline client
    keys, or a file that now has another path, need a restart."""
    paths, loaded_paths = dict(running.secret_files), dict(loaded.secret_files)
    live = {*CREDENTIAL_KEYS, *(("client_keys",) if "client_keys" in paths else ())}
    changed = [spec.env for spec in SPECS if spec.key not in live
               and loaded.value(spec.key) != running.value(spec.key)]
    changed += [f"{spec.env}_FILE" for spec in SPECS if spec.file_variant
                and paths.get(spec.key) != loaded_paths.get(spec.key)]
    def shape(s: Settings) -> list[object]:  # what a further profile is, but its credentials
        return [(p.name, str(p.partner.base_url), p.required, p.side.token.token_file,
                 *(getattr(p.side.auth, key) for key in _PROFILE_AUTH))
                for p in s.more_profiles]

    if shape(loaded) != shape(running):
        changed.append("the credential profiles (added, removed, or a base URL, auth "
                       "setting, token file or required flag)")
    if changed:
        log.warning("settings changed but need a restart to take effect: %s",
                    ", ".join(changed), extra={"fields": {
                        "event": "settings_need_restart", "settings": changed}})


def _same(a: PartnerConfig, b: PartnerConfig) -> bool:
    return all(getattr(a, k) == getattr(b, k) for k in CREDENTIAL_KEYS)


def _with_partner(s: Settings, name: str, partner: PartnerConfig) -> Settings:
    """``s`` with profile ``name``'s credentials replaced."""
    if name == DEFAULT_PROFILE:
        return dataclasses.replace(s, partner=partner)
    more = tuple(dataclasses.replace(p, side=dataclasses.replace(p.side, partner=partner))
                 if p.name == name else p for p in s.more_profiles)
    return dataclasses.replace(s, more_profiles=more)


class CredentialReloader:
    def __init__(self, state: GatewayState, session: aiohttp.ClientSession, clock: Clock,
                 load: Callable[[], Settings]) -> None:
        self._state = state
        self._session = session
        self._clock = clock
        self._load = load
        self._applied = _files_digest(state.settings)
        self._failed: str | None = None  # the digest whose login failed
        self._retry_at: float | None = None
        self._keys_seen = self._client_keys_digest()
        self._force = self._keys_force = False
        self._trigger = asyncio.Event()
        self._keys_trigger = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: Told of every client-key change (worker processes apply it too).
        self.on_client_keys: Callable[[tuple[ClientKey, ...]], None] | None = None

    def trigger(self) -> None:
        """Re-read now (SIGHUP)."""
        self._force = self._keys_force = True
        self._trigger.set()
        self._keys_trigger.set()

    async def start(self) -> None:
        # Two loops: a credential login may take a while, and must never hold up a client
        # key revocation.
        self._tasks = [asyncio.create_task(self._run(), name="credential-reloader"),
                       asyncio.create_task(self._run_keys(), name="client-keys-reloader")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task)

    async def _poll(self, trigger: asyncio.Event, step: Callable[[], Awaitable[object]],
                    what: str) -> None:
        """Run ``step`` every poll interval and whenever ``trigger`` is set (SIGHUP)."""
        interval = self._state.settings.server.secrets_poll_interval or None
        while True:
            if interval is None:
                await trigger.wait()
            else:  # on the injected clock, so a test's clock drives the polling
                await sleep_or_set(self._clock, trigger, interval)
            trigger.clear()
            try:
                await step()
            except Exception:  # never let a bug stop reloading for good
                log.exception("%s reload crashed", what)

    async def _run(self) -> None:
        await self._poll(self._trigger, self.check, "credential")

    async def _run_keys(self) -> None:
        async def step() -> None:
            force, self._keys_force = self._keys_force, False
            self.check_client_keys(force)

        await self._poll(self._keys_trigger, step, "client keys")

    async def check(self) -> str:
        """Apply changed credentials; returns the outcome (also a metric label). After a
        SIGHUP or a rotation, the probe runs again at once (a fix shows within one probe)."""
        force, self._force = self._force, False
        outcome = await self._check(force)
        for held in self._state.profiles.values():
            if held.verdict is not None and (force or outcome == "success"):
                held.verdict.request_probe("rotation" if outcome == "success" else "sighup")
        return outcome

    async def _check(self, force: bool) -> str:
        current = self._state.settings
        digest = _files_digest(current)
        if digest == self._applied and not force:
            return "unchanged"
        retry_due = self._retry_at is None or self._clock.monotonic() >= self._retry_at
        if digest == self._failed and not force and not retry_due:
            return "waiting"  # these files failed; try them again after the interval
        try:
            loaded = self._load()
        except SettingsError as exc:
            self._failed = digest
            self._retry_at = self._clock.monotonic() + current.token.login_retry_interval
            return self._outcome("failure", f"settings invalid: {exc}", digest)
        _note_restart_needed(loaded, current)
        running = {p.name: p for p in current.profiles}
        changed = [p for p in loaded.profiles
                   if p.name in running and not _same(p.partner, running[p.name].partner)]
        if not changed:
            self._applied, self._failed, self._retry_at = digest, None, None
            return self._outcome("unchanged", None, None)
        failed = []
        for profile in changed:  # each profile's manager switches on its own
            was = running[profile.name]
            partner = dataclasses.replace(was.partner, app_key=profile.partner.app_key,
                                          app_secret=profile.partner.app_secret,
                                          partner_id=profile.partner.partner_id)
            mark = CREDENTIAL.set(profile.name) if len(running) > 1 else None
            try:
                token = await self._state.profiles[profile.name].manager.switch_credentials(
                    partner, AuthClient(self._session, partner, was.side.auth, self._clock,
                                        current.upstream.connect_timeout))
            except Exception as exc:  # AuthError, or anything unforeseen: the same slow retry
                reason = exc.reason if isinstance(exc, AuthError) else type(exc).__name__
                failed.append(f"{profile.name}: {reason}")
                continue
            finally:
                if mark is not None:
                    CREDENTIAL.reset(mark)
            self._state.settings = _with_partner(self._state.settings, profile.name, partner)
            log.info("credentials rotated", extra={"fields": {
                "event": "credentials_rotated", "credential": profile.name,
                "app_key_fp": partner.app_key.fingerprint,
                "partner_id": partner.partner_id, "generation": token.generation,
                "token_fp": token.fingerprint}})
        if failed:
            self._failed = digest
            self._retry_at = self._clock.monotonic() + current.token.login_retry_interval
            return self._outcome("failure", "login with the new credentials failed: "
                                 + ", ".join(failed), digest)
        self._applied, self._failed, self._retry_at = digest, None, None
        return self._outcome("success", None, None)

    def _client_keys_path(self) -> str | None:
        return dict(self._state.settings.secret_files).get("client_keys")

    def _client_keys_digest(self) -> str | None:
        path = self._client_keys_path()
        if path is None:
            return None
        try:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as exc:
            return f"unreadable: {exc.strerror}"

    def check_client_keys(self, force: bool = False) -> str:
        """Apply a changed client keys file at once; keep the previous keys if it is bad."""
        path = self._client_keys_path()
        if path is None:
            return "unchanged"
        seen = self._client_keys_digest()
        if seen == self._keys_seen and not force:
            return "unchanged"
        self._keys_seen = seen
        try:
            text = Path(path).read_text(encoding="utf-8")
            keys = parse_client_keys(text)
            if not keys:
                raise ValueError("the file lists no client key")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._state.metrics.credential_reloads.labels("failure").inc()
            log.error("client keys file not applied; keeping the previous keys",
                      extra={"fields": {"event": "client_keys_reload_failed", "path": path,
                                        "problem": problem}})
            return "failure"
        current = self._state.settings
        if keys == current.inbound.client_keys:
            return "unchanged"
        inbound = dataclasses.replace(current.inbound, client_keys=keys)
        self._state.settings = dataclasses.replace(current, inbound=inbound)
        self._state.access = AccessPolicy(keys, inbound.allowed_cidrs, inbound.allowed_routes,
                                          inbound.client_key_header)
        if self.on_client_keys is not None:
            self.on_client_keys(keys)
        self._state.metrics.credential_reloads.labels("success").inc()
        log.info("client keys reloaded", extra={"fields": {
            "event": "client_keys_reloaded", "clients": sorted(k.name for k in keys)}})
        return "success"

    def _outcome(self, outcome: str, problem: str | None, digest: str | None) -> str:
        self._state.metrics.credential_reloads.labels(outcome).inc()
        if problem:
            log.warning("credential reload failed; keeping the current credentials",
                        extra={"fields": {"event": "credentials_reload_failed",
                                          "problem": problem}})
        return outcome
