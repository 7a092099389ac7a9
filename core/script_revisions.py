"""Script revisions as the store keeps them: a new record, the history view, the rollback target.

The server's folder watcher (``ScriptHost``) queues each revision it first sees, loaded or refused,
and the server writes the queue on its event loop (``record``); ``scripts history``, GET
/scripts/{name}/revisions and ``scripts rollback`` read them back.  They live in the store, not in
the data dir, so that every node sharing a PostgreSQL store records a revision once and any node
can roll it back (see docs/scripts.md, "Revisions and rollback").
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from .store import ScriptRevisionRecord, Store

log = logging.getLogger("ssa_server.scripts")

SEEN_BY = f"{socket.gethostname()[:64]} pid {os.getpid()}"


class RevisionError(LookupError):
    """No such script or revision: the message is one line, fit for the CLI and a 404."""


def new_record(name: str, revision: str, source: str, config: str | None, state: str, reason: str | None,
               now: float) -> ScriptRevisionRecord:
    return {"id": f"{name}@{revision}", "name": name, "revision": revision, "seen_at": round(now, 3),
            "state": state, "reason": reason, "source": source, "config": config, "seen_by": SEEN_BY}


def public(record: ScriptRevisionRecord) -> dict[str, Any]:
    """What history shows of a revision: never its texts (they may be large; rollback writes them)."""
    return {"revision": record["revision"], "seen_at": record["seen_at"], "state": record["state"],
            "reason": record["reason"], "seen_by": record["seen_by"],
            "has_config": record["config"] is not None}


async def history(store: Store, name: str) -> list[dict[str, Any]]:
    """``name``'s kept revisions, newest first; RevisionError when there are none."""
    if not (name.isascii() and name.isprintable() and 0 < len(name) <= 64):  # no script has such a name
        raise RevisionError(f"no revisions of a script named {name[:64]!r}")
    found = await store.list_script_revisions(name)
    if not found:
        raise RevisionError(f"no revisions of a script named {name[:64]!r}")
    return [public(r) for r in found]


async def rollback_target(store: Store, name: str, revision: str | None,
                          current: str | None) -> ScriptRevisionRecord:
    """The revision to write back: ``revision``, else the newest loaded revision that is not
    ``current`` (the one in the folder now, None when it cannot be read)."""
    found = await store.list_script_revisions(name)
    if not found:
        raise RevisionError(f"no revisions of a script named {name[:64]!r}")
    if revision is not None:
        for record in found:
            if record["revision"] == revision:
                return record
        raise RevisionError(f"{name} has no revision {revision[:64]} (see ssa-server scripts history {name})")
    for record in found:
        if record["state"] == "loaded" and record["revision"] != current:
            return record
    raise RevisionError(f"{name} has no loaded revision other than the one in the folder")


async def record(store: Store, seen: list[ScriptRevisionRecord], keep: int) -> list[ScriptRevisionRecord]:
    """Write what the watcher saw, in order; the records not written (the store refused) come back
    for the next attempt."""
    for i, item in enumerate(seen):
        try:
            await store.put_script_revision(item, keep)
        except Exception as e:  # StoreUnavailable, StoreDegraded, ...: retried with the next batch
            log.warning("script revision %s not recorded yet: %s", item["id"], type(e).__name__)
            return seen[i:]
    return []
