"""Signed event webhooks, part one: the subscribers and the outbox the events are written to.

``webhooks add URL --events ssa.created,...`` stores a subscriber.  ``WebhookOutbox`` is an
``events.EventSink``: for each event a subscriber asked for it writes one delivery row into the
store (both backends), durably, before ``Events.emit`` returns, so before the request that
caused the event is answered.  The server's delivery task (``webhook_delivery.py``) sends each
row later as a Security Event Token; nothing of the delivery runs on the request's path.

The window, honestly: the SSA's own write and its outbox row are two writes (two journal
batches, two PostgreSQL statements), one right after the other.  A crash (kill -9) between the
two loses that event's webhook; a crash after the outbox row (the response may not even have
been sent) does not: the row is delivered after the restart.  Making them one write would
thread the outbox through every store method that changes an SSA; see README "Webhooks".

Cheap without subscribers: the subscriber list is cached for ``SUBSCRIBERS_REFRESH`` seconds,
and an event nobody subscribed to writes nothing.
"""

from __future__ import annotations

import ipaddress
import secrets as random_ids
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from .errors import ApiError
from .events import ACTIONS, Event
from .key_encryption import KeyEncryption
from .store import DeliveryRecord, Store, WebhookRecord
from .store.records import DELIVERY_DEAD, DELIVERY_PENDING, DELIVERY_STATES

SUBSCRIBERS_REFRESH = 1.0  # seconds a process uses its copy of the subscriber list (webhooks add: seen after)
URL_MAX = 2048
SECRET_MIN, SECRET_MAX = 16, 512  # characters of an HMAC secret
LIST_MAX = 1000  # deliveries `webhooks deliveries` shows at most


class WebhookError(ApiError):
    """A subscriber or a delivery the operator named is wrong (one line, never a secret)."""

    def __init__(self, description: str, status: int = 400, error: str = "invalid_request") -> None:
        super().__init__(description, status=status, error=error)


def check_url(url: str, allow_http: bool) -> str:
    """An https URL (http only to a loopback address, or with ``webhook_allow_http``), without
    credentials or a fragment; WebhookError saying which rule it breaks."""
    if not url or len(url) > URL_MAX or not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise WebhookError(f"a webhook URL is printable ASCII without spaces, at most {URL_MAX} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookError("the webhook URL cannot be parsed") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise WebhookError("a webhook URL is https://HOST/... (or http:// to a loopback address)")
    if parts.username is not None or parts.password is not None:
        raise WebhookError("a webhook URL carries no credentials (use --secret for an HMAC signature)")
    if parts.fragment or url.endswith("#"):
        raise WebhookError("a webhook URL has no fragment")
    if port == 0:
        raise WebhookError("a webhook URL's port is 1-65535")
    if parts.scheme == "http" and not allow_http and not _loopback(parts.hostname):
        raise WebhookError("http:// webhooks go to a loopback address only; use https (or set "
                           "webhook_allow_http)")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_events(events: Sequence[str]) -> list[str]:
    """The actions asked for (``events.ACTIONS``), sorted, each once."""
    wanted = sorted({e.strip() for e in events if e.strip()})
    if not wanted:
        raise WebhookError("--events names at least one action, e.g. ssa.created,ssa.revoked")
    unknown = [e for e in wanted if e not in ACTIONS]
    if unknown:
        raise WebhookError(f"unknown event {unknown[0][:64]!r}; events are: {', '.join(sorted(ACTIONS))}")
    return wanted


def check_secret(secret: str | None) -> str | None:
    if secret is None:
        return None
    if not SECRET_MIN <= len(secret) <= SECRET_MAX or not secret.isascii() or not secret.isprintable():
        raise WebhookError(f"--secret is {SECRET_MIN}-{SECRET_MAX} printable ASCII characters")
    return secret


def view(record: WebhookRecord) -> dict[str, Any]:
    """A subscriber as ``webhooks list`` shows it: whether it has a secret, never the secret."""
    out: dict[str, Any] = {k: v for k, v in record.items() if k != "secret"}
    out["secret"] = record.get("secret") is not None
    return out


def event_facts(event: Event) -> dict[str, Any]:
    """What a SET says of an event: its facts but the client's address (not the receiver's to know)."""
    facts: dict[str, Any] = {"actor": event.actor, "outcome": event.outcome}
    for name in ("reason", "jti", "org_id", "kid", "request_id"):
        value = getattr(event, name)
        if value is not None:
            facts[name] = value
    if event.details:
        facts["details"] = dict(event.details)
    facts["time"] = event.time
    return facts


class Webhooks:
    """Subscribers and their deliveries, for the CLI and the server alike (one home)."""

    def __init__(self, store: Store, encryption: KeyEncryption, *, allow_http: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.encryption = encryption
        self.allow_http = allow_http
        self.clock = clock
        self.outbox = WebhookOutbox(store, clock)

    async def add(self, url: str, events: Sequence[str], secret: str | None = None) -> dict[str, Any]:
        record: WebhookRecord = {"id": f"wh_{random_ids.token_hex(8)}",
                                 "url": check_url(url, self.allow_http),
                                 "events": check_events(events), "secret": None,
                                 "created_at": int(self.clock())}
        secret = check_secret(secret)
        if secret is not None:  # (sealed under key_encryption_key when it is set)
            record["secret"] = self.encryption.seal_text(f"webhook {record['id']}", secret)
        await self.store.add_webhook(record)
        return view(record)

    async def list_subscribers(self) -> list[dict[str, Any]]:
        return [view(r) for r in await self.store.list_webhooks()]

    async def remove(self, webhook_id: str) -> None:
        """Its pending deliveries become dead when their turn comes ("subscriber removed")."""
        if not await self.store.delete_webhook(webhook_id):
            raise WebhookError(f"No webhook with id {webhook_id[:64]!r}.", status=404, error="not_found")

    def secret_of(self, record: WebhookRecord) -> str | None:
        sealed = record.get("secret")
        return None if sealed is None else self.encryption.open_text(f"webhook {record['id']}", sealed)

    async def deliveries(self, state: str | None = None, subscriber: str | None = None,
                         limit: int = LIST_MAX) -> list[DeliveryRecord]:
        if state is not None and state not in DELIVERY_STATES:
            raise WebhookError(f"--state is one of {', '.join(DELIVERY_STATES)}")
        return await self.store.list_deliveries(state=state, subscriber=subscriber, limit=limit)

    async def replay(self, delivery_id: str | None = None, *, dead: bool = False) -> list[str]:
        """Back to pending, due now, its attempts counted afresh: the named delivery (whatever its
        state), or with ``dead`` every dead one.  The delivery ids replayed."""
        if (delivery_id is None) == (not dead):
            raise WebhookError("replay takes a DELIVERY_ID or --dead")
        if delivery_id is not None:
            found = await self.store.get_delivery(delivery_id)
            if found is None:
                raise WebhookError(f"No delivery with id {delivery_id[:64]!r}.", status=404,
                                   error="not_found")
            rows = [found]
        else:
            rows = await self.store.list_deliveries(state=DELIVERY_DEAD, limit=1_000_000)
        for row in rows:
            await self.store.update_delivery(row["id"], {"state": DELIVERY_PENDING, "attempts": 0,
                                                         "next_attempt_at": self.clock(), "lease_until": 0.0,
                                                         "last_error": None, "delivered_at": None})
        return [row["id"] for row in rows]


class WebhookOutbox:
    """The event sink of the webhooks: one outbox row per event per subscriber that asked for
    it, in one durable store write per batch of events; then the delivery task is woken."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.wake: Callable[[], None] = lambda: None  # the server's delivery task sets it
        self._subscribers: list[WebhookRecord] = []
        self._read_at = float("-inf")

    @property
    def listening(self) -> bool:
        """False while the subscribers read within the last second are none (``Events.wanted``):
        no event is built for it then; a stale reading listens, and the next publish reads again."""
        return bool(self._subscribers) or time.monotonic() - self._read_at >= SUBSCRIBERS_REFRESH

    async def subscribers(self) -> list[WebhookRecord]:
        if time.monotonic() - self._read_at >= SUBSCRIBERS_REFRESH:
            self._subscribers = await self.store.list_webhooks()
            self._read_at = time.monotonic()
        return self._subscribers

    async def publish(self, events: Sequence[Event]) -> None:
        subscribers = await self.subscribers()
        if not subscribers:
            return
        now = self.clock()
        rows: list[DeliveryRecord] = [
            {"id": uuid.uuid4().hex, "subscriber": s["id"], "url": s["url"], "action": e.action,
             "event": event_facts(e), "state": DELIVERY_PENDING, "attempts": 0, "next_attempt_at": now,
             "lease_until": 0.0, "last_error": None, "created_at": now, "delivered_at": None}
            for e in events for s in subscribers if e.action in s["events"]]
        if rows:
            await self.store.add_deliveries(rows)
            self.wake()
