"""What happened, said once: the server's events and the sinks they go to.

The services say what they did as ``Event``s (``Events.emit``); every sink gets each of them: the
audit trail (every action, hash-chained in the store) and the webhook outbox (the actions a
subscriber asked for, delivered later as Security Event Tokens).  One vocabulary for both, below:
an action's name is the same in the audit trail, in ``GET /audit?action=``, in
``webhooks add --events`` and in the events' SETs.

An event carries facts, never a secret: no token, client secret, SSA (JWT), private key or script
source goes into ``details``.

A sink's failure never fails the caller: the action it records has already happened (an SSA
stored and answered for), so ``emit`` logs the failure (ERROR, naming the action and the sink)
and goes on with the next sink.  A sink that must not lose an event makes it durable itself before
``emit`` returns (the audit trail and the outbox write to the store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .observe import CURRENT

log = logging.getLogger("ssa_server.events")

# --- the vocabulary ---
SSA_CREATED = "ssa.created"
SSA_REVOKED = "ssa.revoked"  # one event per SSA revoked
SSA_USED = "ssa.used"  # a validation that succeeded (a one-time SSA is now USED)
SSA_VALIDATION_FAILED = "ssa.validation_failed"  # outcome "refused", reason: unknown/used/expired/revoked
SSA_EXPIRED = "ssa.expired"  # seen expired by the cleaner, one event per SSA
SSA_JWT_READ = "ssa.jwt_read"  # GET /ssa/jwt
TOKEN_REFUSED = "token.refused"  # a token grant that failed (reason: the OAuth error code)
CLIENT_CREATED = "client.created"
CLIENT_DELETED = "client.deleted"
KEY_ROTATED = "key.rotated"  # a next key generated and announced
KEY_ACTIVATED = "key.activated"
KEY_RETIRED = "key.retired"
SCRIPT_LOADED = "script.loaded"
SCRIPT_REFUSED = "script.refused"
SCRIPT_UNLOADED = "script.unloaded"
TEMPLATE_SAVED = "template.saved"
TEMPLATE_DELETED = "template.deleted"

ACTIONS: frozenset[str] = frozenset({
    SSA_CREATED, SSA_REVOKED, SSA_USED, SSA_VALIDATION_FAILED, SSA_EXPIRED, SSA_JWT_READ,
    TOKEN_REFUSED, CLIENT_CREATED, CLIENT_DELETED, KEY_ROTATED, KEY_ACTIVATED, KEY_RETIRED,
    SCRIPT_LOADED, SCRIPT_REFUSED, SCRIPT_UNLOADED, TEMPLATE_SAVED, TEMPLATE_DELETED,
})

SERVER_ACTOR = "server"  # the server's own tasks (the cleaner, scheduled rotation, the script watcher)
ANONYMOUS_ACTOR = "anonymous"  # a caller without a token (POST /ssa/validation, a refused POST /token)


def cli_actor() -> str:
    """``cli:<user>``: the actor of a CLI command (the operating-system user running it)."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry for the uid (a container's random uid)
        import os

        return f"cli:uid{os.getuid()}"


@dataclass(slots=True)
class Event:  # (not frozen: emit stamps the events it is handed in place; dataclasses.replace cost ~10 us)
    action: str  # one of ACTIONS
    actor: str  # the client_id, cli_actor(), or SERVER_ACTOR
    outcome: str = "ok"  # "ok", "refused" (the request was refused) or "failed" (an error of ours)
    reason: str | None = None  # why, for an outcome other than "ok": a short fixed phrase or error code
    jti: str | None = None
    org_id: str | None = None
    kid: str | None = None
    address: str | None = None  # the client's address (behind trusted_proxies, as the throttle sees it)
    request_id: str | None = None  # filled in by emit from the request being served
    time: float = 0.0  # seconds since the epoch; filled in by emit from its clock when 0
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON values only, never a secret


class EventSink(Protocol):
    """Something that takes every event: the audit trail, the webhook outbox."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Take these events (one action may make several: a revoke by org_id); raise on failure."""


class Events:
    """The services' one way to say what they did; each sink gets every event, in order."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 address: Callable[[Mapping[str, Any]], str] | None = None) -> None:
        """``address``: the client's address from a request's ASGI scope (the throttle's view,
        behind ``trusted_proxies``); emit fills in an event's missing address with it."""
        self._clock = clock
        self._address = address
        self._sinks: list[EventSink] = []

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    @property
    def wanted(self) -> bool:
        """Whether anything listens (callers skip building events when nothing does): a sink with a
        ``listening`` attribute says for itself (the webhook outbox: while it knows of no
        subscriber, it does not)."""
        for sink in self._sinks:
            if getattr(sink, "listening", True):
                return True
        return False

    async def emit(self, *events: Event) -> None:
        if not self._sinks or not events:
            return
        info = CURRENT.get()
        now = self._clock()
        address = None
        if info is not None and info.scope is not None and self._address is not None:
            address = self._address(info.scope)
        request_id = info.request_id if info is not None else None
        for e in events:  # handed over by the caller: stamped in place
            if not e.time:
                e.time = now
            if e.request_id is None:
                e.request_id = request_id
            if e.address is None:
                e.address = address
        stamped = list(events)
        for sink in self._sinks:
            try:
                await sink.publish(stamped)
            except Exception:
                log.exception("event sink %s failed for %s", type(sink).__name__, stamped[0].action)
