"""Private keys encrypted at rest under the master key ``key_encryption_key`` (docs/keys.md).

A key record keeps its public JWK in the clear (``/jwks``, ``keys list``, verification) and its
private members as one field, ``jwk_encrypted``::

    {"v": 1, "kek": "<16 hex: the master key's id>", "nonce": "<b64url, 12 bytes>",
     "ciphertext": "<b64url: AES-256-GCM of the private members' JSON, then the 16-byte tag>"}

The associated data is ``ssa-server key v1 <kid>``: a ciphertext moved to another record (or a
version changed) fails to decrypt instead of loading the wrong key.  A fresh random nonce is drawn
for every record write.  The master key's id (a hash of it, not the key) names which master key
sealed a record, so that a wrong key is told apart from a damaged record and a rotation
(``keys rewrap``) knows what is left to do.  Decryption happens when the key ring first loads a
key; the signing path uses the decrypted key as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import secret_refs
from .settings import Settings, SettingsError
from .store import ENCRYPTED_FIELD, PRIVATE_JWK_MEMBERS, KeyRecord, Store, can_sign, public_jwk

FORMAT = 1
KEY_BYTES = 32
HOW_TO_MAKE = "python3 -c 'import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"


class KeyDecryptionError(RuntimeError):
    """A stored key cannot be decrypted; the message is one line naming the kid, never a key."""


def master_key(text: str, where: str) -> bytes:
    """The 32 bytes of a base64url master key (padding optional); SettingsError otherwise."""
    stripped = text.strip()
    try:
        raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise SettingsError(f"{where} must hold 32 random bytes as base64url (make one: {HOW_TO_MAKE})")
    return raw


def key_id(key: bytes) -> str:
    """A name for a master key that reveals nothing of it (16 hex digits of a keyed hash)."""
    return hashlib.sha256(b"ssa-server key_encryption_key id\x00" + key).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aad(kid: str) -> bytes:
    return f"ssa-server key v{FORMAT} {kid}".encode()


class KeyEncryption:
    """Seals the private part of key records under ``current`` (None: keys stay in the clear)
    and opens what ``current`` or one of the ``older`` master keys sealed."""

    def __init__(self, current: bytes | None = None, *older: bytes | None) -> None:
        self._keys: dict[str, AESGCM] = {}
        self.current_id = key_id(current) if current is not None else None
        self.older_ids = [key_id(k) for k in older if k is not None]
        for key in (*older, current):
            if key is not None:
                self._keys[key_id(key)] = AESGCM(key)

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] = os.environ) -> KeyEncryption:
        """The master keys the settings' references name (read now); SettingsError naming the
        reference when one cannot be read or is not a key."""
        return cls(*(read_master_key(name, getattr(settings, name), environ)
                     for name in ("key_encryption_key", "key_encryption_key_previous")))

    @property
    def enabled(self) -> bool:
        return self.current_id is not None

    def seal(self, record: KeyRecord) -> KeyRecord:
        """The record as stored: private members encrypted under the current master key (a new
        nonce), or unchanged without one (or without private members: a verify-only key)."""
        if self.current_id is None or PRIVATE_JWK_MEMBERS.isdisjoint(record["jwk"]):
            return record
        private = {k: v for k, v in record["jwk"].items() if k in PRIVATE_JWK_MEMBERS}
        nonce = os.urandom(12)
        ciphertext = self._keys[self.current_id].encrypt(nonce, json.dumps(private).encode(),
                                                         _aad(record["kid"]))
        sealed: dict[str, Any] = dict(record, jwk=public_jwk(record["jwk"]))
        sealed[ENCRYPTED_FIELD] = {"v": FORMAT, "kek": self.current_id, "nonce": _b64(nonce),
                                   "ciphertext": _b64(ciphertext)}
        return cast(KeyRecord, sealed)

    def open(self, record: KeyRecord) -> dict[str, Any]:
        """The record's whole JWK (private members decrypted); KeyDecryptionError naming the kid."""
        sealed = record.get(ENCRYPTED_FIELD)
        if sealed is None:
            return record["jwk"]
        kid = record["kid"]
        if not isinstance(sealed, dict) or sealed.get("v") != FORMAT:
            raise KeyDecryptionError(f"key {kid} is encrypted in an unknown format")
        if not self._keys:
            raise KeyDecryptionError(f"key {kid} is stored encrypted and no key_encryption_key is set")
        cipher = self._keys.get(str(sealed.get("kek")))
        if cipher is None:
            known = ", ".join(i for i in (self.current_id, *self.older_ids) if i)
            raise KeyDecryptionError(f"key {kid} is encrypted under master key {sealed.get('kek')}, not "
                                     f"under the master keys given ({known}): set key_encryption_key to "
                                     "that master key (or key_encryption_key_previous, after a rotation)")
        try:
            plain = cipher.decrypt(_unb64(sealed.get("nonce")), _unb64(sealed.get("ciphertext")), _aad(kid))
            private = json.loads(plain)
        except (InvalidTag, ValueError, TypeError):
            raise KeyDecryptionError(f"key {kid} cannot be decrypted under master key {sealed.get('kek')}: "
                                     "the record was altered") from None
        if not isinstance(private, dict) or not set(private) <= PRIVATE_JWK_MEMBERS:
            raise KeyDecryptionError(f"key {kid} decrypts to something that is not a key's private part")
        return dict(record["jwk"], **private)

    def seal_text(self, label: str, text: str) -> dict[str, Any] | str:
        """Another secret at rest (a webhook's HMAC secret): sealed as a key's private part is,
        with ``ssa-server <label>`` as associated data; the text itself without a master key."""
        if self.current_id is None:
            return text
        nonce = os.urandom(12)
        ciphertext = self._keys[self.current_id].encrypt(nonce, text.encode(), f"ssa-server {label}".encode())
        return {"v": FORMAT, "kek": self.current_id, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}

    def open_text(self, label: str, sealed: dict[str, Any] | str) -> str:
        """What ``seal_text`` sealed; KeyDecryptionError naming ``label`` (never a value)."""
        if isinstance(sealed, str):
            return sealed
        cipher = self._keys.get(str(sealed.get("kek"))) if isinstance(sealed, dict) else None
        if cipher is None:
            raise KeyDecryptionError(f"{label} is sealed under master key {sealed.get('kek')}, which is not "
                                     "set (key_encryption_key, key_encryption_key_previous)")
        try:
            return cipher.decrypt(_unb64(sealed.get("nonce")), _unb64(sealed.get("ciphertext")),
                                  f"ssa-server {label}".encode()).decode()
        except (InvalidTag, ValueError, TypeError):
            raise KeyDecryptionError(f"{label} cannot be decrypted: the record was altered") from None

    def needs_sealing(self, record: KeyRecord) -> bool:
        """A record to rewrite under the current master key: private members in the clear, or
        sealed under another master key (the previous one)."""
        if self.current_id is None:
            return False
        sealed = record.get(ENCRYPTED_FIELD)
        if sealed is None:
            return not PRIVATE_JWK_MEMBERS.isdisjoint(record["jwk"])
        return not isinstance(sealed, dict) or sealed.get("kek") != self.current_id

    def resealed(self, record: KeyRecord) -> dict[str, Any]:
        """The changes that rewrite ``record`` under the current master key (one store write)."""
        fresh = self.seal(cast(KeyRecord, dict(record, jwk=self.open(record))))
        return {"jwk": fresh["jwk"], ENCRYPTED_FIELD: fresh.get("jwk_encrypted")}


def read_master_key(name: str, ref: str, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The master key a reference names (None for ""); SettingsError naming ``name`` and the
    reference, never a value."""
    if not ref:
        return None
    try:
        text = secret_refs.read(ref, environ)
    except secret_refs.SecretUnreadable as e:
        raise SettingsError(f"{name}: {e}") from None
    return master_key(text, f"{name} ({ref})")


async def reseal(store: Store, encryption: KeyEncryption, records: list[KeyRecord]) -> int:
    """Rewrite each record stored in the clear or under an older master key under the current one,
    each in one store write (a crash leaves every record whole, under the old key or the new);
    how many were rewritten.  The caller holds ``store.lock("keys")``."""
    done = 0
    for r in records:
        if encryption.needs_sealing(r):
            await store.update_key(r["kid"], encryption.resealed(r))
            done += 1
    return done


async def rewrap(store: Store, encryption: KeyEncryption) -> dict[str, Any]:
    """``keys rewrap``: every key under the current master key of ``encryption`` (the new one),
    opening each with it or its older keys.  Every record is opened before the first write: a
    key no given master key opens stops the rewrap before it changes anything."""
    async with store.lock("keys"):
        records = await store.list_keys()
        for r in records:
            encryption.open(r)
        done = await reseal(store, encryption, records)
        compacted = await store.compact_keys() if done else False
    # (A key a signing backend holds, e.g. in a PKCS#11 token, has no private part here: nothing to rewrap.)
    return {"master_key": encryption.current_id, "rewrapped": done, "keys": len(records),
            "verify_only": sum(1 for r in records if not can_sign(r)),
            "in_signing_backend": sum(1 for r in records if r.get("backend") not in (None, "software")),
            "old_versions_dropped": compacted}
