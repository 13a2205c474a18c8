"""Sealing what the fleet keeps in Redis: AES-GCM under the configured store key (or plain
without one), and the errors of a store that cannot be read. Shared by the token store, the
Idempotency-Key store and the shared GET cache; ``cryptography`` is imported only when a key
is set."""

from __future__ import annotations

import base64
import os
from typing import Final

from gateway.redact import Secret


class StoreError(Exception):
    """The store could not be reached (no secrets in the message)."""


class StoreCorrupt(StoreError):
    """The store answered, but our entry is unreadable: another owner's, encrypted with
    another key (or not at all), or garbled. The lease holder may overwrite it."""


class SealedWithAnotherKey(StoreCorrupt):
    """The entry is sealed with a store key this replica does not have (or sealed while it
    has none, or plain while it has one): GATEWAY_STORE_KEY differs across the fleet.
    ``live``: a replica that can read it has been seen lately (never overwrite it then)."""

    live = False


class Sealer:
    """AES-GCM over the serialised state, keyed from the configured store key (HKDF with
    ``info`` naming the use), ``owner`` (or ``aad``) bound as associated data.

    ``key`` seals what is written (None: written in clear, ``plain:``). ``previous``
    (GATEWAY_STORE_KEY_PREVIOUS) only opens: what another key sealed, or, given as
    :data:`PLAIN`, what was written in clear (the steps of switching a key on or off)."""

    def __init__(self, key: Secret | None, owner: str, info: bytes = b"token-state-v1",
                 previous: Secret | None = None) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        def aead(secret: Secret) -> AESGCM:
            return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32,
                               salt=b"repairy-gateway-store",
                               info=info).derive(secret.reveal().encode()))

        plain_previous = previous is not None and previous.reveal() == PLAIN
        self.last_current = True  # the last text opened was sealed as this replica writes
        self._aead = aead(key) if key is not None else None
        self._readers = ([self._aead] if self._aead is not None else []) + (
            [aead(previous)] if previous is not None and not plain_previous else [])
        self.reads_plain = key is None or plain_previous
        self._aad = owner.encode()

    def seal(self, data: bytes, aad: bytes | None = None) -> str:
        if self._aead is None:
            return "plain:" + data.decode()
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, data, self._aad if aad is None else aad)
        return "gcm:" + base64.b64encode(sealed).decode()

    def open(self, text: str, aad: bytes | None = None) -> bytes:
        from cryptography.exceptions import InvalidTag

        if text.startswith("plain:"):
            if not self.reads_plain:
                raise SealedWithAnotherKey("the stored state is not encrypted, but "
                                           "GATEWAY_STORE_KEY is set")
            self.last_current = self._aead is None
            return text[len("plain:"):].encode()
        if not text.startswith("gcm:"):
            raise StoreCorrupt("the stored state is neither sealed nor plain")
        raw = base64.b64decode(text[4:])
        for reader in self._readers:
            try:
                opened = reader.decrypt(raw[:12], raw[12:], self._aad if aad is None else aad)
            except InvalidTag:
                continue
            self.last_current = reader is self._aead
            return opened
        raise SealedWithAnotherKey("the stored state does not decrypt with this "
                                   "GATEWAY_STORE_KEY (nor GATEWAY_STORE_KEY_PREVIOUS)")


#: GATEWAY_STORE_KEY_PREVIOUS=plain: also read what was written without a store key.
PLAIN: Final = "plain"


def sealer_for(key: Secret | None, previous: Secret | None, owner: str = "",
               info: bytes = b"token-state-v1") -> Sealer | None:
    """The sealer of these keys (None: no key at all, everything in clear)."""
    if key is None and previous is None:
        return None
    return Sealer(key, owner, info, previous)


def seal(sealer: Sealer | None, data: bytes, aad: bytes | None = None) -> str:
    """``data`` as kept in Redis: sealed with the store key, or marked plain without one."""
    return sealer.seal(data, aad) if sealer is not None else "plain:" + data.decode()


def unseal(sealer: Sealer | None, text: str, aad: bytes | None = None) -> bytes:
    """What :func:`seal` kept (:class:`StoreError` when it cannot be read with this key)."""
    if sealer is not None:
        return sealer.open(text, aad)
    if not text.startswith("plain:"):
        raise SealedWithAnotherKey("the stored state is encrypted, but GATEWAY_STORE_KEY is not "
                                   "set")
    return text[len("plain:"):].encode()
