"""Signing keys: generation, rotation, the public JWKS, and signing SSAs.

Keys live in the store (whose files are 0600), never in a response or a log line.  Kids follow
Janssen's shape, ``ssa_<uuid>_sig_<alg>``.  A rotated key stops signing at once but stays in
``/jwks`` until the last SSA it may have signed has expired (``remove_after``).

``KeyRing.sign`` is the one way to sign an SSA: it picks where the signature is made (a signing
thread, the signing helper process, or inline) and the key ring owns both (``start_signing``,
``close``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jwcrypto import jwk

from .signing import PROCESS_ALGS, SLOW_ALGS, Signer
from .signing_process import SigningProcess, SigningUnavailable
from .ssa import ACTIVE
from .store import KEY_ACTIVE, KEY_RETIRED, KEY_RETIRING, KeyRecord, Store

log = logging.getLogger("ssa_server.keys")

SSA_USE, TOKEN_USE = "ssa", "token"

_KEY_PARAMS: dict[str, dict[str, Any]] = {
    "RS": {"kty": "RSA", "size": 2048},
    "PS": {"kty": "RSA", "size": 2048},
    "ES256": {"kty": "EC", "crv": "P-256"},
    "ES384": {"kty": "EC", "crv": "P-384"},
    "ES512": {"kty": "EC", "crv": "P-521"},
    "EdDSA": {"kty": "OKP", "crv": "Ed25519"},
    "HS256": {"kty": "oct", "size": 256},
}


def generate_key(alg: str, use: str, now: int) -> KeyRecord:
    """A new private key for ``alg`` as a store record (status active)."""
    params = _KEY_PARAMS.get(alg) or _KEY_PARAMS[alg[:2]]
    kid = f"{use}_{uuid.uuid4()}_sig_{alg.lower()}"
    key = jwk.JWK.generate(kid=kid, **params)
    return KeyRecord(kid=kid, alg=alg, use=use, jwk=json.loads(key.export(private_key=True)),
                     status=KEY_ACTIVE, created_at=now, remove_after=None)


class KeyRing:
    """The keys this process signs and verifies with, rebuilt when the store's key set changes."""

    def __init__(self, store: Store, signing_alg: str, *, refresh_interval: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._alg = signing_alg
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._records: list[KeyRecord] = []
        self._objects: dict[str, jwk.JWK] = {}
        self._signers: dict[str, Signer] = {}
        self._active: dict[str, KeyRecord] = {}
        self._uses: dict[str, str] = {}
        self._fingerprint = ""
        self._checked_at = 0.0
        self._lock = asyncio.Lock()
        self._threads: ThreadPoolExecutor | None = None  # RSA signatures, once start_signing ran
        self.signing_process: SigningProcess | None = None  # EC and EdDSA signatures, likewise

    # --- loading ---
    async def load(self, *, adopt_alg: bool = True) -> None:
        """Read the keys; create the token key and an SSA key if missing.

        With ``adopt_alg`` (the server) a configured alg with no active key gets a new key and
        the other active keys retire; without it (CLI commands) an existing active key of any
        alg is used as it is, so a CLI run with other settings never rotates the server's keys.
        """
        async with self._lock, self._store.lock("keys"):  # workers starting together: one creates
            records = await self._store.list_keys()
            now = int(self._clock())
            if not any(r["use"] == TOKEN_USE and r["status"] == KEY_ACTIVE for r in records):
                rec = generate_key("HS256", TOKEN_USE, now)
                await self._store.add_key(rec)
            active_ssa = [r for r in records if r["use"] == SSA_USE and r["status"] == KEY_ACTIVE]
            wanted = [r for r in active_ssa if r["alg"] == self._alg] if adopt_alg else active_ssa
            if not wanted:
                await self._replace_active_ssa_keys(records, generate_key(self._alg, SSA_USE, now), now)
            self._install(await self._store.list_keys())

    async def refresh_if_due(self) -> None:
        """Pick up keys rotated by another process (``ssa-server keys rotate``)."""
        now = self._clock()
        if now - self._checked_at < self._refresh_interval:
            return
        self._checked_at = now
        records = await self._store.list_keys()
        if _fingerprint(records) != self._fingerprint:
            self._install(records)

    def _install(self, records: list[KeyRecord]) -> None:
        self._records = records
        self._objects = {r["kid"]: jwk.JWK(**r["jwk"]) for r in records}
        self._signers = {r["kid"]: Signer(r["jwk"], r["alg"], r["kid"]) for r in records
                         if r["status"] == KEY_ACTIVE}
        self._uses = {r["kid"]: r["use"] for r in records if r["status"] != KEY_RETIRED}
        self._active = {use: rec for use in (SSA_USE, TOKEN_USE)
                        if (rec := self._newest_active(use)) is not None}
        self._fingerprint = _fingerprint(records)
        self._checked_at = self._clock()

    # --- rotation ---
    async def rotate(self, alg: str | None = None) -> KeyRecord:
        """Add a new SSA key and sign with it from now on (default alg: the current key's)."""
        async with self._lock, self._store.lock("keys"):
            records = await self._store.list_keys()
            now = int(self._clock())
            current = [r for r in records if r["use"] == SSA_USE and r["status"] == KEY_ACTIVE]
            alg = alg or (max(current, key=lambda r: r["created_at"])["alg"] if current else self._alg)
            new = generate_key(alg, SSA_USE, now)
            await self._replace_active_ssa_keys(records, new, now)
            self._install(await self._store.list_keys())
            return new

    async def _replace_active_ssa_keys(self, records: list[KeyRecord], new: KeyRecord, now: int) -> None:
        """Add ``new``, then retire the keys that were active: another process refreshing in
        between sees two active keys (both published), never none."""
        await self._store.add_key(new)
        active = [r for r in records if r["use"] == SSA_USE and r["status"] == KEY_ACTIVE]
        if not active:
            return
        # Every SSA still valid may have been signed by one of these keys: keep them published
        # until the last of those expires.
        valid = await self._store.find_ssas(status=ACTIVE)
        remove_after = max([now] + [s["expiration"] for s in valid])
        for r in active:
            await self._store.update_key(r["kid"], {"status": KEY_RETIRING, "remove_after": remove_after})

    async def drop_expired_keys(self) -> int:
        """Mark retiring keys past ``remove_after`` as retired (they leave /jwks)."""
        now = int(self._clock())
        dropped = 0
        for r in await self._store.list_keys():
            if r["status"] == KEY_RETIRING and (r.get("remove_after") or 0) < now:
                await self._store.update_key(r["kid"], {"status": KEY_RETIRED})
                dropped += 1
        if dropped:
            self._install(await self._store.list_keys())
        return dropped

    # --- use ---
    def active(self, use: str = SSA_USE) -> KeyRecord:
        """The newest active key for this use (SSA keys: of the configured alg if there is one)."""
        try:
            return self._active[use]
        except KeyError:
            raise RuntimeError(f"no active {use} key; run load() first") from None

    def _newest_active(self, use: str) -> KeyRecord | None:
        candidates = [r for r in self._records if r["use"] == use and r["status"] == KEY_ACTIVE]
        preferred = [r for r in candidates if r["alg"] == self._alg] if use == SSA_USE else candidates
        pool = preferred or candidates
        return max(pool, key=lambda r: r["created_at"]) if pool else None

    def key_object(self, kid: str, use: str) -> jwk.JWK:
        """The key with this kid if it serves ``use``; KeyError otherwise."""
        if self._uses.get(kid) != use:
            raise KeyError(kid)
        return self._objects[kid]

    async def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """An SSA: compact JWS over ``claims`` with the active SSA key (``alg`` and ``kid`` are
        set from it, whatever ``header`` says).

        Once ``start_signing`` ran (the server): an RSA signature in a signing thread (it
        releases the GIL, so the event loop serves the next request meanwhile), an EC or EdDSA
        one by the signing process (a thread would wait for the GIL behind the loop after every
        signature).  Inline otherwise: before (CLI commands), after ``close``, for HMAC, and when
        the signing process is unavailable (it died, hung or cannot start: logged)."""
        record = self.active()
        signer = self._signers[record["kid"]]
        if self._threads is not None and signer.alg in SLOW_ALGS:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, signer.sign, header, claims)
        if self.signing_process is not None and signer.alg in PROCESS_ALGS:
            signing_input = signer.signing_input(header, claims)
            try:
                signature = await self.signing_process.sign(record["kid"], signer.alg, record["jwk"],
                                                            signing_input)
            except SigningUnavailable as e:
                log.warning("signing process unavailable (%s): signing on the event loop", e)
                return signer.sign(header, claims)
            return (signing_input + b"." + signature).decode()
        return signer.sign(header, claims)

    def sign_inline(self, header: dict[str, Any], claims: dict[str, Any], use: str = SSA_USE) -> str:
        """Compact JWS with the active key of ``use``, made here and now (access tokens: HMAC)."""
        return self._signers[self.active(use)["kid"]].sign(header, claims)

    def start_signing(self) -> None:
        """Make signatures off the event loop from now on (the server; CLI commands sign inline):
        RSA in as many threads as cores (more only add GIL contention), EC and EdDSA in the
        signing process, started now if the active key needs it (else by the first such
        signature), while the server begins serving.  Called on the event loop, after ``load``."""
        self.close()
        self._threads = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="ssa-sign")
        self.signing_process = SigningProcess()
        active = self._active.get(SSA_USE)
        if active is not None and active["alg"] in PROCESS_ALGS:
            try:
                self.signing_process.start()
            except SigningUnavailable as e:  # the first signature tries again (and signs inline)
                log.warning("%s", e)

    def close(self) -> None:
        """Stop signing off the loop: the signing process killed and reaped, the threads let go
        (they end once idle).  Signatures are made inline after this."""
        if self.signing_process is not None:
            self.signing_process.close()
            self.signing_process = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    def active_alg(self, use: str = SSA_USE) -> str:
        return self.active(use)["alg"]

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """Public SSA keys still needed for verification: active and retiring, never private parts."""
        now = int(self._clock())
        keys = []
        for r in sorted(self._records, key=lambda r: r["created_at"], reverse=True):
            if r["use"] != SSA_USE or r["status"] not in (KEY_ACTIVE, KEY_RETIRING):
                continue
            if r["status"] == KEY_RETIRING and (r.get("remove_after") or 0) < now:
                continue
            public = json.loads(self._objects[r["kid"]].export_public())
            public.update(kid=r["kid"], use="sig", alg=r["alg"])
            keys.append(public)
        return {"keys": keys}

    def records(self) -> list[dict[str, Any]]:
        """Key records without private material (no ``jwk``: no KeyRecord), for ``keys list``."""
        return [{k: v for k, v in r.items() if k != "jwk"} for r in self._records]


def _fingerprint(records: list[KeyRecord]) -> str:
    return "|".join(sorted(f"{r['kid']}:{r['status']}:{r.get('remove_after')}" for r in records))
