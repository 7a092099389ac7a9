"""``ssa-server audit verify``: walk the audit chain and its checkpoints, name the first bad event.

What is checked, for each event by seq: its ``hash`` is the hash of its content (else it was
changed), its seq follows the previous one (else events are missing: a gap), its ``prev_hash`` is
the previous event's ``hash`` (else it was reordered or its predecessor replaced).  The first event
kept is seq 1 with ``prev_hash`` = ``GENESIS``, or follows a checkpoint (a retention cut) whose
hash it names.  Each checkpoint's JWS verifies with the stored public key of its ``kid`` (a
retired key included: the store keeps it), says what the checkpoint record says, and matches the
event of its seq; a checkpoint past the last event means events were removed from the end.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jwcrypto import jwk, jws

from .store import AuditCheckpointRecord, AuditRecord, KeyRecord, public_jwk
from .store.records import GENESIS, audit_hash


@dataclass(frozen=True)
class Problem:
    seq: int
    what: str

    def line(self) -> str:
        return f"audit chain broken at seq {self.seq}: {self.what}"


def jws_kid(token: str) -> str:
    """The ``kid`` of a compact JWS's protected header ("" if it has none)."""
    head = token.split(".", 1)[0]
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return str(header.get("kid", ""))


def _checkpoint_problem(cp: AuditCheckpointRecord, keys: dict[str, KeyRecord]) -> str | None:
    try:
        record = keys.get(jws_kid(cp["jws"]))
        if record is None:
            return f"checkpoint signed by an unknown key ({cp.get('kid')!r})"
        token = jws.JWS()
        token.deserialize(cp["jws"])
        token.verify(jwk.JWK(**public_jwk(record["jwk"])), alg=record["alg"])
        claims = json.loads(token.payload)
    except Exception:
        return "bad checkpoint signature"
    if claims.get("seq") != cp["seq"] or claims.get("hash") != cp["hash"]:
        return "checkpoint record differs from what its signature covers"
    return None


async def verify(events: AsyncIterator[AuditRecord], checkpoints: list[AuditCheckpointRecord],
                 keys: list[KeyRecord]) -> tuple[Problem | None, dict[str, Any]]:
    """The first problem (by seq), or None; and what was walked (counts, first and last seq)."""
    by_kid = {k["kid"]: k for k in keys}
    anchors = {cp["seq"]: cp for cp in checkpoints}
    problems: list[Problem] = []
    for cp in checkpoints:
        what = _checkpoint_problem(cp, by_kid)
        if what is not None:
            problems.append(Problem(cp["seq"], what))
    prev: AuditRecord | None = None
    first = count = 0
    async for event in events:
        seq = event["seq"]
        count += 1
        if audit_hash(dict(event)) != event["hash"]:
            problems.append(Problem(seq, "hash mismatch (the event was changed)"))
        expected: str | None
        if prev is None:
            first = seq
            anchor = anchors.get(seq - 1)
            expected = GENESIS if seq == 1 else anchor["hash"] if anchor is not None else None
            if expected is None:
                problems.append(Problem(1, f"gap: events 1 to {seq - 1} are missing (no checkpoint "
                                           f"anchors seq {seq})"))
        else:
            expected = prev["hash"]
            if seq != prev["seq"] + 1:
                problems.append(Problem(prev["seq"] + 1, f"gap: events {prev['seq'] + 1} to {seq - 1} "
                                                         "are missing"))
        if expected is not None and event["prev_hash"] != expected:
            problems.append(Problem(seq, "prev_hash is not the previous event's hash (events reordered, "
                                         "or one before it replaced)"))
        anchor = anchors.get(seq)
        if anchor is not None and anchor["hash"] != event["hash"]:
            problems.append(Problem(seq, "the event differs from its signed checkpoint"))
        prev = event
    last = prev["seq"] if prev is not None else 0
    for cp in checkpoints:
        if cp["seq"] > last:
            problems.append(Problem(last + 1, f"events from seq {last + 1} are missing (a checkpoint "
                                              f"covers seq {cp['seq']})"))
            break
    summary = {"events": count, "first_seq": first, "last_seq": last, "checkpoints": len(checkpoints)}
    return (min(problems, key=lambda p: p.seq) if problems else None), summary
