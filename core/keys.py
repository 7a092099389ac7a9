"""Signing keys: generation, rotation, the public JWKS, and signing SSAs.

Keys live in the store (whose files are 0600), never in a response or a log line.  Kids follow
Janssen's shape, ``ssa_<uuid>_sig_<alg>``.  A rotated key stops signing at once but stays in
``/jwks`` until the last SSA it may have signed has expired (``remove_after``).

``KeyRing.sign`` is the one way to sign an SSA: it picks where the signature is made (a signing
thread, the signing helper process, or inline) and the key ring owns both (``start_signing``,
``close``).  SSA keys are made and loaded through the configured signing backend (``signers.py``:
software keys in the store, or keys in a PKCS#11 token); the access-token HMAC key is always a
software key.
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
from typing import Any, cast

from jwcrypto import jwk

from .key_encryption import KeyDecryptionError, KeyEncryption, reseal
from .metrics import Metrics
from .signing import PROCESS_ALGS, SLOW_ALGS, Signer
from .key_states import SIGNING_STATUSES, activates_at, next_switch, pending, signing_key, state, superseded
from .signers import SOFTWARE, SigningBackend, SigningBackendError, SoftwareBackend, backend_name
from .signing_process import SigningProcess, SigningUnavailable
from .ssa import ACTIVE
from .tracing import OFF, Tracing
from .events import KEY_ACTIVATED, KEY_ROTATED, SERVER_ACTOR, Event, Events
from .events import KEY_RETIRED as KEY_RETIRED_EVENT  # (the store's KEY_RETIRED is a status)
from .store import (ENCRYPTED_FIELD, KEY_ACTIVE, KEY_NEXT, KEY_RETIRED, KEY_RETIRING, KeyRecord, Store,
                    can_sign)

log = logging.getLogger("ssa_server.keys")

SSA_USE, TOKEN_USE = "ssa", "token"

_SOFTWARE = SoftwareBackend()


def generate_key(alg: str, use: str, now: int, *, activates_at: int | None = None,
                 backend: SigningBackend | None = None) -> KeyRecord:
    """A new key for ``alg`` as a store record, made by ``backend`` (default: a software key):
    active from ``now``, or next (announced) until ``activates_at``."""
    kid = f"{use}_{uuid.uuid4()}_sig_{alg.lower()}"
    at = now if activates_at is None else activates_at
    made = (backend or _SOFTWARE).generate(alg, kid)
    return cast(KeyRecord, dict(made, kid=kid, alg=alg, use=use, status=KEY_ACTIVE if at <= now else KEY_NEXT,
                                created_at=now, remove_after=None, activates_at=at))


# Seconds after a switch before the cleaner writes the old key's end (remove_after): an SSA signed
# just before the switch may still be on its way to the store, and a node may sign with the old
# key up to key_refresh_interval after an immediate (--now) rotation.
SETTLE_GRACE = 60


class KeyRing:
    """The keys this process signs and verifies with, rebuilt when the store's key set changes or
    a pending key's activation time comes (``key_states``)."""

    def __init__(self, store: Store, signing_alg: str, *, refresh_interval: float = 2.0,
                 activation_delay: int = 600, rotation_days: int = 0,
                 clock: Callable[[], float] = time.time, encryption: KeyEncryption | None = None,
                 metrics: Metrics | None = None, events: Events | None = None,
                 actor: str = SERVER_ACTOR, tracing: Tracing = OFF,
                 backend: SigningBackend | None = None) -> None:
        """``events``: key.rotated/activated/retired are said there, by ``actor`` (the server's
        tasks, or the CLI's cli:<user>), once the store holds the change."""
        self._store = store
        self._tracing = tracing
        self.events = events if events is not None else Events()
        self.actor = actor
        self._noted: list[Event] = []  # the key events of the change under way, emitted after it
        self.backend = backend or _SOFTWARE  # where new SSA keys are made
        self._backends: dict[str, SigningBackend] = {SOFTWARE: _SOFTWARE, self.backend.name: self.backend}
        self._held: dict[str, Signer] = {}  # kid -> the signer of a key a backend holds (found once)
        self._unreachable: set[str] = set()  # kids logged as not reachable through their backend
        self.encryption = encryption or KeyEncryption()
        self._private: dict[str, dict[str, Any]] = {}  # kid -> the whole JWK, decrypted once
        self._unopened: set[str] = set()  # kids logged as undecryptable here
        self.resealed = 0  # key records ``load`` rewrote under the current master key
        self._metrics = metrics if metrics is not None else Metrics()
        self._alg = signing_alg
        self._refresh_interval = refresh_interval
        self._activation_delay = activation_delay
        self._rotation_days = rotation_days
        self._clock = clock
        self._records: list[KeyRecord] = []
        self._objects: dict[str, jwk.JWK] = {}
        self._signers: dict[str, Signer] = {}
        self._active: dict[str, KeyRecord] = {}
        self._uses: dict[str, str] = {}
        self._fingerprint = ""
        self._checked_at = 0.0
        self._switch_at = float("inf")  # when a pending key starts to sign
        self._lock = asyncio.Lock()
        self._threads: ThreadPoolExecutor | None = None  # RSA signatures, once start_signing ran
        self.signing_process: SigningProcess | None = None  # EC and EdDSA signatures, likewise

    # --- loading ---
    async def load(self, *, adopt_alg: bool = True) -> None:
        """Read the keys; create the token key and an SSA key if missing.

        With ``adopt_alg`` (the server) a configured alg that neither signs nor is pending gets a
        new key at once and the other signing keys retire; without it (CLI commands) the signing
        key of any alg is used as it is, so a CLI run with other settings never rotates the
        server's keys.
        """
        await asyncio.to_thread(self.backend.open)  # a wrong PIN, a missing token: one line, now
        async with self._lock, self._store.lock("keys"):  # workers starting together: one creates
            stored = await self._store.list_keys()
            records = self._opened(stored, strict=True)  # a key that cannot be opened stops the start
            await self._seal_locked(stored)
            now = int(self._clock())
            if signing_key(records, TOKEN_USE, now) is None:
                rec = generate_key("HS256", TOKEN_USE, now)
                await self._add(rec)
            current = signing_key(records, SSA_USE, now)
            wanted = current is not None
            if adopt_alg and current is not None and not self._configured(current):
                wanted = any(self._configured(r) for r in pending(records, SSA_USE, now))
            if not wanted:
                await self._replace_signing_ssa_keys(records, await self._generate(self._alg, now), now)
            self._install(await self._store.list_keys())

    def _configured(self, record: KeyRecord) -> bool:
        """A key of the configured alg made by the configured backend."""
        return record["alg"] == self._alg and backend_name(record) == self.backend.name

    async def _generate(self, alg: str, now: int, activates_at: int | None = None) -> KeyRecord:
        """A new SSA key made by the backend, in a thread (a token takes a while for an RSA key)."""
        return await asyncio.to_thread(generate_key, alg, SSA_USE, now, activates_at=activates_at,
                                       backend=self.backend)

    async def _add(self, record: KeyRecord) -> None:
        """Store a new key, its private part encrypted when a master key is configured."""
        await self._store.add_key(self.encryption.seal(record))

    async def _seal_locked(self, stored: list[KeyRecord]) -> None:
        """Keys stored in the clear, or under the previous master key, rewritten under the current
        one (``key_encryption.reseal``: one store write each)."""
        done = await reseal(self._store, self.encryption, stored)
        if done:
            self.resealed += done
            log.info("%d private keys encrypted under key_encryption_key %s", done,
                     self.encryption.current_id)

    def _opened(self, records: list[KeyRecord], *, strict: bool) -> list[KeyRecord]:
        """The records with their whole JWK, each key decrypted the first time it is seen.

        ``strict`` (loading, and a process's first read): KeyDecryptionError naming the kid of a key
        that cannot be decrypted.  Otherwise (a refresh, serving) such a key, made by a process with
        another master key, is logged once and kept public only: this process verifies with it but
        cannot sign with it, instead of failing every request."""
        out = []
        for r in records:
            if ENCRYPTED_FIELD in r:
                whole = self._private.get(r["kid"])
                if whole is None:
                    try:
                        whole = self._private[r["kid"]] = self.encryption.open(r)
                    except KeyDecryptionError as e:
                        if strict:
                            raise
                        if r["kid"] not in self._unopened:
                            self._unopened.add(r["kid"])
                            log.error("%s: this process verifies with it but cannot sign with it", e)
                        whole = r["jwk"]
                r = cast(KeyRecord, {k: v for k, v in r.items() if k != ENCRYPTED_FIELD})
                r["jwk"] = whole
            out.append(r)
        return out

    async def refresh_if_due(self) -> None:
        """Pick up keys rotated by another process (``ssa-server keys rotate``), and switch to a
        pending key once its activation time comes (a comparison; no store read)."""
        now = self._clock()
        if now >= self._switch_at:
            self._install(self._records)
        if now - self._checked_at < self._refresh_interval:
            return
        self._checked_at = now
        records = await self._store.list_keys()
        if _fingerprint(records) != self._fingerprint:
            self._install(records)

    def _install(self, records: list[KeyRecord]) -> None:
        now = self._clock()
        records = self._opened(records, strict=not self._fingerprint)
        self._records = records
        # (An HMAC key without its secret, one this process cannot decrypt, has nothing to verify with.)
        self._objects = {r["kid"]: jwk.JWK(**r["jwk"]) for r in records if r["jwk"].get("kty") != "oct"
                         or "k" in r["jwk"]}
        strict = not self._fingerprint
        self._signers = {r["kid"]: signer for r in records
                         if r["status"] in SIGNING_STATUSES and can_sign(r)
                         and (signer := self._signer(r, strict)) is not None}
        self._uses = {r["kid"]: r["use"] for r in records if r["status"] != KEY_RETIRED}
        self._active = {use: rec for use in (SSA_USE, TOKEN_USE)
                        if (rec := signing_key(records, use, now)) is not None}
        self._switch_at = next_switch(records, now)
        self._fingerprint = _fingerprint(records)
        self._checked_at = now

    def _signer(self, record: KeyRecord, strict: bool) -> Signer | None:
        """The signer of a key record, through the backend that holds its private part.  A key of
        a backend this process is not configured for only verifies here.  A key its backend cannot
        find: SigningBackendError when ``strict`` (start-up), else logged once, verify only."""
        kid, name = record["kid"], backend_name(record)
        if name == SOFTWARE:
            return Signer(record["jwk"], record["alg"], kid)  # (SoftwareBackend.load, without the hop)
        if kid in self._held:
            return self._held[kid]
        backend = self._backends.get(name)
        if backend is None:
            return None
        try:
            held = backend.load(record)
        except SigningBackendError as e:
            if strict:
                raise
            if kid not in self._unreachable:
                self._unreachable.add(kid)
                log.error("%s: this process verifies with it but cannot sign with it", e)
            return None
        signer = self._held[kid] = Signer.over(held.alg, held.kid, held.sign)
        return signer

    # --- rotation ---
    async def rotate(self, alg: str | None = None, *, now: bool = False) -> KeyRecord:
        """Add a new SSA key (default alg: the signing key's), published at once, signing after
        ``activation_delay`` (``now``: at once, an emergency).  A key announced before and not yet
        signing is retired (it signed nothing): at most one key is pending."""
        async with self._lock, self._store.lock("keys"):
            records = await self._store.list_keys()
            new = await self._rotate_locked(records, alg, now)
            self._install(await self._store.list_keys())
        await self._emit_noted()
        return new

    def _note(self, action: str, kid: str, **details: Any) -> None:
        if self.events.wanted:
            self._noted.append(Event(action, self.actor, kid=kid, details=details))

    async def _emit_noted(self) -> None:
        noted, self._noted = self._noted, []
        if noted:
            await self.events.emit(*noted)

    async def _rotate_locked(self, records: list[KeyRecord], alg: str | None, at_once: bool) -> KeyRecord:
        now = int(self._clock())
        current = signing_key(records, SSA_USE, now)
        alg = alg or (current["alg"] if current else self._alg)
        for r in pending(records, SSA_USE, now):
            await self._store.update_key(r["kid"], {"status": KEY_RETIRED})
            self._note(KEY_RETIRED_EVENT, r["kid"], status=KEY_RETIRED)
        if at_once or self._activation_delay <= 0:
            new = await self._generate(alg, now)
            self._note(KEY_ROTATED, new["kid"], alg=alg, activates_at=now)
            await self._replace_signing_ssa_keys(records, new, now)
            self._note(KEY_ACTIVATED, new["kid"])
        else:
            new = await self._generate(alg, now, now + self._activation_delay)
            await self._add(new)
            self._note(KEY_ROTATED, new["kid"], alg=alg, activates_at=now + self._activation_delay)
        return new

    async def _replace_signing_ssa_keys(self, records: list[KeyRecord], new: KeyRecord, now: int) -> None:
        """Add ``new`` (signing from ``now``), then retire the keys that signed until now:
        another process refreshing in between sees both published, never none."""
        await self._add(new)
        await self._retire([r for r in records if r["use"] == SSA_USE and r["status"] in SIGNING_STATUSES
                            and activates_at(r) <= now], now)

    async def _retire(self, keys: list[KeyRecord], now: int) -> None:
        if not keys:
            return
        # Every SSA still valid may have been signed by one of these keys: keep them published
        # until the last of those expires.
        valid = await self._store.find_ssas(status=ACTIVE)
        remove_after = max([now] + [s["expiration"] for s in valid])
        for r in keys:
            await self._store.update_key(r["kid"], {"status": KEY_RETIRING, "remove_after": remove_after})
            self._note(KEY_RETIRED_EVENT, r["kid"], status=KEY_RETIRING, remove_after=remove_after)

    async def maintain(self) -> None:
        """The cleaner's key work: write the statuses of a switch that happened, drop keys past
        their ``remove_after``, and rotate when ``rotation_days`` is due.  Under
        ``store.lock("keys")``, re-reading the keys: on PostgreSQL exactly one node does each."""
        await self.drop_expired_keys()
        async with self._lock, self._store.lock("keys"):
            records = await self._store.list_keys()
            changed = await self._settle_locked(records)
            current = await self._store.list_keys() if changed else records
            changed = await self._rotate_if_due_locked(current) or changed
            if changed:
                self._install(await self._store.list_keys())
        await self._emit_noted()

    async def _settle_locked(self, records: list[KeyRecord]) -> bool:
        now = int(self._clock())
        current = signing_key(records, SSA_USE, now)
        if current is None:
            return False
        changed = False
        if current["status"] == KEY_NEXT:
            await self._store.update_key(current["kid"], {"status": KEY_ACTIVE})
            self._note(KEY_ACTIVATED, current["kid"])
            changed = True
        if now >= activates_at(current) + SETTLE_GRACE:
            old = superseded(records, SSA_USE, now)
            await self._retire(old, now)
            changed = changed or bool(old)
        return changed

    async def _rotate_if_due_locked(self, records: list[KeyRecord]) -> bool:
        """Scheduled rotation: each key signs ``rotation_days``; the next is announced
        ``activation_delay`` before that."""
        if self._rotation_days <= 0:
            return False
        now = int(self._clock())
        current = signing_key(records, SSA_USE, now)
        if current is None or pending(records, SSA_USE, now):
            return False
        if now < activates_at(current) + self._rotation_days * 86400 - self._activation_delay:
            return False
        new = await self._rotate_locked(records, None, False)
        log.info("scheduled key rotation: %s announced, signs from %d", new["kid"], activates_at(new))
        return True

    async def drop_expired_keys(self) -> int:
        """Mark retiring keys past ``remove_after`` as retired (they leave /jwks)."""
        now = int(self._clock())
        dropped = 0
        for r in await self._store.list_keys():
            if r["status"] == KEY_RETIRING and (r.get("remove_after") or 0) < now:
                await self._store.update_key(r["kid"], {"status": KEY_RETIRED})
                self._note(KEY_RETIRED_EVENT, r["kid"], status=KEY_RETIRED)
                dropped += 1
        if dropped:
            self._install(await self._store.list_keys())
        await self._emit_noted()
        return dropped

    # --- use ---
    def active(self, use: str = SSA_USE) -> KeyRecord:
        """The key that signs for this use now (as of the last ``refresh_if_due``)."""
        try:
            return self._active[use]
        except KeyError:
            raise RuntimeError(f"no active {use} key; run load() first") from None

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
        signer = self._signers.get(record["kid"])
        if signer is None:
            raise SigningBackendError(f"key {record['kid']} is held by the {backend_name(record)} signing "
                                      f"backend and this process cannot sign with it (signing_backend)")
        with self._tracing.span("sign") as span:  # (off: a constant no-op, no attributes dict made)
            span.set_attribute("ssa.signing.alg", signer.alg)
            span.set_attribute("ssa.signing.kid", record["kid"])
            started = time.perf_counter()
            token = await self._sign_with(record, signer, header, claims)
            self._metrics.signed(signer.alg, time.perf_counter() - started)
        return token

    async def _sign_with(self, record: KeyRecord, signer: Signer, header: dict[str, Any],
                         claims: dict[str, Any]) -> str:
        software = backend_name(record) == SOFTWARE
        if self._threads is not None and (signer.alg in SLOW_ALGS or not software):
            # (A token's signature: the call releases the GIL while the token works.)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, signer.sign, header, claims)
        if self.signing_process is not None and software and signer.alg in PROCESS_ALGS:
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
        self._stop_signing()
        self._threads = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="ssa-sign")
        self.signing_process = SigningProcess()
        active = self._active.get(SSA_USE)
        if active is not None and active["alg"] in PROCESS_ALGS and backend_name(active) == SOFTWARE:
            try:
                self.signing_process.start()
            except SigningUnavailable as e:  # the first signature tries again (and signs inline)
                log.warning("%s", e)

    def close(self) -> None:
        """Stop signing off the loop: the signing process killed and reaped, the threads let go
        (they end once idle), the backend's sessions closed.  Signatures are made inline after
        this (a backend opens again when asked)."""
        self._stop_signing()
        self._held.clear()
        for backend in self._backends.values():
            backend.close()

    def _stop_signing(self) -> None:
        if self.signing_process is not None:
            self.signing_process.close()
            self.signing_process = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    def active_alg(self, use: str = SSA_USE) -> str:
        return self.active(use)["alg"]

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """Public SSA keys: the next key (announced), the active one, and the retiring ones still
        needed for verification; never private parts."""
        now = int(self._clock())
        keys = []
        for r in sorted(self._records, key=lambda r: (activates_at(r), r["created_at"]), reverse=True):
            if r["use"] != SSA_USE or r["status"] == KEY_RETIRED:
                continue
            if r["status"] == KEY_RETIRING and (r.get("remove_after") or 0) < now:
                continue
            public = json.loads(self._objects[r["kid"]].export_public())
            public.update(kid=r["kid"], use="sig", alg=r["alg"])
            keys.append(public)
        return {"keys": keys}

    def records(self) -> list[dict[str, Any]]:
        """Key records without private material, for ``keys list``: each key's state now (next,
        active, retiring, retired) as ``status``, with its times."""
        now = self._clock()
        return [dict({k: v for k, v in r.items() if k != "jwk"}, status=state(r, self._records, now),
                     activates_at=activates_at(r), remove_after=r.get("remove_after"))
                for r in self._records]


def _fingerprint(records: list[KeyRecord]) -> str:
    return "|".join(sorted(f"{r['kid']}:{r['status']}:{r.get('remove_after')}:{r.get('activates_at')}"
                           for r in records))
