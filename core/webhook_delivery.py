"""Signed event webhooks, part two: the server's delivery task (the outbox is ``webhooks.py``).

Each process that serves (every node, every ``--workers`` worker) runs one ``Deliverer``: it
claims due rows of the outbox (``Store.claim_deliveries``: atomic across processes, a lease so
that a dead node's claims are taken again once they run out), signs each as a Security Event
Token (RFC 8417) with the SSA signing key, and POSTs it in a thread of its own pool, at most
``webhook_concurrency`` at once: a slow or dead receiver holds those threads, never the event
loop nor the request that caused the event.

The SET: header ``typ: secevent+jwt`` (``alg``, ``kid``: the signing key's); claims ``iss`` (the
issuer), ``iat``, ``jti`` (the delivery id, the same in every attempt), ``aud`` (the subscriber's
URL), ``toe`` (when it happened), ``events`` = ``{EVENT_URI + action: facts}``.  Headers:
``Content-Type: application/secevent+jwt``, ``SSA-Delivery-Id``, ``SSA-Event``, and with a
subscriber secret ``SSA-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.

At least once: a 2xx is delivered; anything else (a status, a refused connection, a timeout) is
retried after ``webhook_retry_base * 2**(attempts-1)`` seconds (at most ``webhook_retry_max``),
the upper half of it drawn at random (jitter), until ``webhook_max_attempts`` attempts have
failed: then the row is dead (``webhooks deliveries --state dead``, ``webhooks replay``).  A
receiver sees a delivery id again only after a failure or a lease that ran out: it dedupes by jti.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from .key_encryption import KeyDecryptionError
from .keys import KeyRing
from .settings import Settings
from .store import DeliveryRecord, StoreUnavailable
from .store.records import DELIVERY_DEAD, DELIVERY_DELIVERED
from .webhooks import Webhooks

log = logging.getLogger("ssa_server.webhooks")

EVENT_URI = "https://ssa-server/events/"  # + the action: the SET's event type
CONTENT_TYPE = "application/secevent+jwt"  # RFC 8417 §2.3
SET_TYP = "secevent+jwt"
ERROR_MAX = 200  # characters of last_error


def backoff(attempts: int, base: float, cap: float, draw: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: exponential, capped, its
    upper half random (so that receivers coming back are not hit by every sender at once)."""
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return delay / 2 + draw() * delay / 2


def post(url: str, body: bytes, headers: dict[str, str], timeout: float,
         read_max: int) -> tuple[int | None, str]:
    """One POST, in a delivery thread: (status, "") or (None, why).  Connect and each read within
    ``timeout``, the whole exchange within twice that (a receiver that trickles its answer is cut
    off), at most ``read_max`` bytes of the answer read, no redirect followed, no proxy used."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    cut = threading.Timer(2 * timeout, _cut, (conn,))
    cut.daemon = True  # never holds up the interpreter's exit
    cut.start()
    try:
        conn.request("POST", target, body=body, headers=headers)
        answer = conn.getresponse()
        answer.read(read_max)
        return answer.status, ""
    except (OSError, http.client.HTTPException, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return None, f"{type(e).__name__}: {first}"[:ERROR_MAX]
    finally:
        cut.cancel()
        conn.close()


def _cut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Deliverer:
    """The delivery task of one process (``Server.start``)."""

    def __init__(self, settings: Settings, webhooks: Webhooks, keys: KeyRing,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.webhooks = webhooks
        self.store = webhooks.store
        self.keys = keys
        self.clock = clock
        self.lease = 2 * settings.webhook_timeout + 5  # a claim outlives an attempt's cut-off
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._threads: ThreadPoolExecutor | None = None
        webhooks.outbox.wake = self.wake

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._threads = ThreadPoolExecutor(self.settings.webhook_concurrency,
                                           thread_name_prefix="ssa-webhook")
        try:
            while True:
                self._wake.clear()
                try:
                    await self.claim()
                except StoreUnavailable:
                    pass  # readiness says why; the next poll retries
                except Exception as e:  # keep the task alive
                    log.error("webhook delivery failed: %s: %s", type(e).__name__, e)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # lands as its timeout fires, and this loop would outlive Server.stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.webhook_poll_interval):
                        await self._wake.wait()
        finally:
            for task in list(self._running):
                task.cancel()  # its claim runs out and another pass (or node) delivers it
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def claim(self) -> int:
        """Claim as many due rows as there are free delivery slots and start them."""
        free = self.settings.webhook_concurrency - len(self._running)
        if free <= 0:
            return 0
        now = self.clock()
        rows = await self.store.claim_deliveries(now, now + self.lease, free)
        for row in rows:
            task = asyncio.create_task(self.deliver(row), name="ssa-webhook-delivery")
            self._running.add(task)
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()  # a slot is free: look for the next due row

    async def deliver(self, row: DeliveryRecord) -> None:
        try:
            await self._deliver(row)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. the store refused the result: the lease runs out, it is retried
            log.error("webhook delivery %s failed: %s: %s", row["id"], type(e).__name__, e)

    async def _deliver(self, row: DeliveryRecord) -> None:
        subscriber = await self.store.get_webhook(row["subscriber"])
        if subscriber is None:
            await self.store.update_delivery(row["id"], {"state": DELIVERY_DEAD, "lease_until": 0.0,
                                                         "last_error": "subscriber removed"})
            return
        await self.keys.refresh_if_due()
        body = (await self.keys.sign({"typ": SET_TYP}, self.claims(row))).encode()
        headers = {"Content-Type": CONTENT_TYPE, "SSA-Delivery-Id": row["id"], "SSA-Event": row["action"],
                   "User-Agent": "ssa-server-webhooks"}
        try:
            secret = self.webhooks.secret_of(subscriber)
        except KeyDecryptionError as e:  # (a master key no longer set): an attempt that failed
            await self._record(row, None, str(e)[:ERROR_MAX])
            return
        if secret is not None:
            headers["SSA-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        loop = asyncio.get_running_loop()
        assert self._threads is not None
        status, why = await loop.run_in_executor(self._threads, post, row["url"], body, headers,
                                                 self.settings.webhook_timeout,
                                                 self.settings.webhook_response_max_kb * 1024)
        await self._record(row, status, why)

    def claims(self, row: DeliveryRecord) -> dict[str, Any]:
        facts = dict(row["event"])
        return {"iss": self.settings.issuer, "iat": int(self.clock()), "jti": row["id"], "aud": row["url"],
                "toe": int(facts.pop("time", row["created_at"])),
                "events": {EVENT_URI + row["action"]: facts}}

    async def _record(self, row: DeliveryRecord, status: int | None, why: str) -> None:
        now = self.clock()
        attempts = row["attempts"] + 1
        if status is not None and 200 <= status < 300:
            await self.store.update_delivery(row["id"], {"state": DELIVERY_DELIVERED, "attempts": attempts,
                                                         "lease_until": 0.0, "last_error": None,
                                                         "delivered_at": now})
            return
        error = why or f"HTTP {status}"
        settings = self.settings
        if attempts >= settings.webhook_max_attempts:
            log.warning("webhook delivery %s to %s is dead after %d attempts: %s", row["id"],
                        row["subscriber"], attempts, error)
            await self.store.update_delivery(row["id"], {"state": DELIVERY_DEAD, "attempts": attempts,
                                                         "lease_until": 0.0, "last_error": error})
            return
        wait = backoff(attempts, settings.webhook_retry_base, settings.webhook_retry_max)
        await self.store.update_delivery(row["id"], {"attempts": attempts, "next_attempt_at": now + wait,
                                                     "lease_until": 0.0, "last_error": error})
