"""The optional token file: the managed token kept on disk so a restart reuses it.

Written atomically (a private temporary file in the same directory, fsync, rename) with mode
0600 from the moment it exists. A stored token is reused only for the same upstream, App Key
and Partner ID, and only while it is still usable; anything else is ignored with a warning.
Expiries are stored as Unix times and turned back into monotonic ones on load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from gateway.clock import Clock
from gateway.token.config import PartnerConfig, TokenSide
from gateway.token.value import Token, is_usable

log = logging.getLogger("gateway.token_file")
FORMAT_VERSION = 1


def _owner(partner: PartnerConfig) -> dict[str, str]:
    return {"upstream": str(partner.base_url), "app_key_fp": partner.app_key.fingerprint,
            "partner_id": partner.partner_id}


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, readable by the owner only (0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)  # mkstemp already uses 0600; keep it explicit
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_token(path: Path, token: Token, partner: PartnerConfig) -> None:
    doc: dict[str, Any] = {
        "version": FORMAT_VERSION, **_owner(partner),
        "access_token": token.access, "refresh_token": token.refresh,
        "generation": token.generation, "obtained_via": token.via,
        "obtained_at": token.obtained_wall, "expires_at": token.wall(token.expires_at),
        "refresh_expires_at": (token.wall(token.refresh_expires_at)
                               if token.refresh_expires_at is not None else None),
    }
    try:
        write_private_file(path, json.dumps(doc).encode())
    except OSError as exc:
        log.warning("cannot write the token file", extra={"fields": {
            "event": "token_file_error", "path": str(path), "error": exc.strerror}})


def load_token(path: Path, side: TokenSide, clock: Clock) -> Token | None:
    """The stored token if it belongs to this partner and is still usable, else None."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable token file", extra={"fields": {
            "event": "token_file_ignored", "path": str(path), "reason": type(exc).__name__}})
        return None
    reason = _unusable_reason(doc, side.partner)
    if reason is None:
        now_mono, now_wall = clock.monotonic(), clock.time()

        def mono(unix: float) -> float:
            return now_mono + (unix - now_wall)

        refresh, refresh_at, generation = _optional_fields(doc, path)
        obtained = float(doc["obtained_at"])
        # Never trust a stored lifetime beyond the documented one (a file written by an older
        # version may hold a misread expiry).
        expires = min(float(doc["expires_at"]), obtained + side.auth.access_token_default_ttl)
        if refresh_at is not None:
            refresh_at = min(refresh_at, obtained + side.auth.refresh_token_default_ttl)
        token = Token(access=doc["access_token"], refresh=refresh, generation=generation,
                      via="login", obtained_at=mono(obtained), expires_at=mono(expires),
                      refresh_expires_at=mono(refresh_at) if refresh_at is not None else None,
                      obtained_wall=obtained, partner_id=side.partner.partner_id)
        if is_usable(token, now_mono, side.token.token_expiry_margin):
            log.info("reusing the stored token", extra={"fields": {
                "event": "token_file_loaded", "token_fp": token.fingerprint,
                "generation": token.generation}})
            return token
        reason = "expired"
    log.info("not reusing the stored token", extra={"fields": {
        "event": "token_file_ignored", "path": str(path), "reason": reason}})
    return None


def _optional_fields(doc: dict[str, Any], path: Path) -> tuple[str | None, float | None, int]:
    """The refresh token, its expiry and the generation; a bad one is ignored with a warning
    (a refresh token without a readable expiry is dropped: it cannot be scheduled)."""
    bad: list[str] = []
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        bad.append("refresh_token")
        refresh = None
    refresh_at: float | None = None
    raw_at = doc.get("refresh_expires_at")
    if raw_at is not None:
        if isinstance(raw_at, int | float) and not isinstance(raw_at, bool) and _finite(raw_at):
            refresh_at = float(raw_at)
        else:
            bad.append("refresh_expires_at")
            refresh = None
    generation = doc.get("generation", 0)
    if not isinstance(generation, int) or isinstance(generation, bool) or not (
            0 <= generation < 2**53):
        bad.append("generation")
        generation = 0
    if bad:
        log.warning("ignoring bad fields of the token file", extra={"fields": {
            "event": "token_file_field_ignored", "path": str(path), "fields": bad}})
    return refresh, refresh_at, generation


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _unusable_reason(doc: object, partner: PartnerConfig) -> str | None:
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        return "unknown format"
    if any(doc.get(k) != v for k, v in _owner(partner).items()):
        return "stored for another upstream, App Key or Partner ID"
    if not isinstance(doc.get("access_token"), str) or not doc["access_token"]:
        return "no access token"
    try:
        times = float(doc["obtained_at"]), float(doc["expires_at"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return "no expiry"
    if not all(math.isfinite(t) for t in times):
        return "no expiry"
    return None
