"""What every store keeps beside the SSAs: the record shapes, key statuses, the tables, and copies.

Records are plain JSON-ready dicts (the TypedDicts below; the SSA's, ``SsaRecord``, and its
statuses are the model's, ``ssa.py``), so every backend stores them as they are and every caller
gets copies it may change freely.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NotRequired, TypedDict

# Key statuses (see docs/keys.md): a next key is published and signs from its activates_at; an
# active key signs; a retiring one only verifies (published in /jwks until its remove_after); a
# retired one is kept but never used or published.  Which key signs at a given time is decided by
# the clock against activates_at (``key_states.py``); the statuses are written afterwards.
KEY_NEXT, KEY_ACTIVE, KEY_RETIRING, KEY_RETIRED = "next", "active", "retiring", "retired"
KEY_STATES = (KEY_NEXT, KEY_ACTIVE, KEY_RETIRING, KEY_RETIRED)

# Every table of every store and the field that identifies its records, in export order (the
# keys before the SSAs they signed, so an importer can verify SSAs as it goes).
ID_FIELDS = {"clients": "client_id", "keys": "kid", "templates": "name", "statuslists": "id",
             "script_revisions": "id", "assertion_jtis": "id", "ssa": "jti",
             "audit": "id", "audit_checkpoints": "id", "webhooks": "id", "webhook_deliveries": "id"}
TABLES = tuple(ID_FIELDS)
# Tables ``store export`` leaves out: the webhook outbox is work in flight, not state to move (a
# delivery pending in one store would be sent again by the other).
NOT_EXPORTED = frozenset({"webhook_deliveries"})


class ClientRecord(TypedDict):
    client_id: str
    name: str
    # "sha256$<salt hex>$<digest hex>"; the secret itself is never stored; "" for a private_key_jwt client
    secret_hash: str
    scopes: list[str]
    created_at: int
    # absent: client_secret_basic or client_secret_post; "private_key_jwt": a client assertion
    # (``client_assertions.py``) verified by the public ``jwks`` or the keys at ``jwks_uri``
    token_endpoint_auth_method: NotRequired[str]
    jwks: NotRequired[dict[str, Any]]
    jwks_uri: NotRequired[str]


class AssertionRecord(TypedDict):
    """A client assertion's jti, kept until the assertion can no longer be accepted: a replay cache."""

    id: str  # sha256 hex of client_id NUL jti
    client_id: str
    expires_at: int  # the assertion's exp plus the leeway; purged by the cleaner after


class KeyRecord(TypedDict):
    kid: str
    alg: str  # RS256 ... EdDSA for SSA keys, HS256 for the access-token key
    use: str  # "ssa" (signs SSAs, published in /jwks) or "token" (signs access tokens, never published)
    # The private JWK; with key_encryption_key only its public members (the private ones are in
    # jwk_encrypted, ``key_encryption.py``).  The store is 0600 either way.
    jwk: dict[str, Any]
    jwk_encrypted: NotRequired[dict[str, Any]]  # {"v", "kek", "nonce", "ciphertext"} (docs/keys.md)
    status: str  # one of KEY_STATES
    created_at: int
    remove_after: NotRequired[int | None]  # epoch seconds after which a retiring key leaves /jwks
    activates_at: NotRequired[int]  # epoch seconds from which it signs (absent on older keys: created_at)
    # A key whose private part a signing backend holds (``signers.py``): its name ("pkcs11"; absent:
    # software, the private JWK is in ``jwk``) and its id there (PKCS#11: the CKA_ID, our kid).
    # ``jwk`` then holds the public members only, here and in every export.
    backend: NotRequired[str]
    key_id: NotRequired[str]

# The JWK members that are private (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2): what an encrypted
# key record holds only inside jwk_encrypted, and what ``store export --no-private-keys`` leaves out.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
ENCRYPTED_FIELD = "jwk_encrypted"


def can_sign(record: KeyRecord | dict[str, Any]) -> bool:
    """Whether the record holds its private key (in the clear or encrypted), or names the signing
    backend that holds it (a token key: a process with that backend signs with it)."""
    return (ENCRYPTED_FIELD in record or not PRIVATE_JWK_MEMBERS.isdisjoint(record["jwk"])
            or record.get("backend") not in (None, "software"))


def public_jwk(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k not in PRIVATE_JWK_MEMBERS}


class StatusListRecord(TypedDict):
    """One Token Status List (``status_list.py``): ``next`` counts the indexes handed out (their
    order is ``status_list.Permutation(key, size)``); a full list is never rewritten, a new one is added."""

    id: str  # "1", "2", ...: the list's URI is ISSUER/statuslists/ID
    size: int  # indexes in the list
    next: int  # counters [0, next) are handed out (reserved in blocks; some may stay unused)
    key: str  # hex: the permutation key (not a credential: it only hides the allocation order)
    created_at: int


class TemplateRecord(TypedDict):
    name: str
    fields: dict[str, Any]  # the POST /ssa body to reuse
    created_at: int


REVISION_STATES = ("loaded", "refused", "failed")
# A revision's texts are at most the scripts folder's caps (``SandboxLimits.max_source_kb``,
# ``script_folder.MAX_CONFIG``): what an import may bring too.
REVISION_SOURCE_MAX, REVISION_CONFIG_MAX = 256 * 1024, 64 * 1024


class ScriptRevisionRecord(TypedDict):
    """One revision of a user script as the server's folder watcher first saw it (``script_revisions.py``):
    kept so that ``scripts rollback`` can write it back, on any node sharing the store."""

    id: str  # "NAME@REVISION": one record per content, however many nodes see it
    name: str
    revision: str  # the content hash GET /scripts shows (NAME.py and NAME.toml together)
    seen_at: float  # epoch seconds (ms precision) it was first seen
    state: str  # loaded | refused | failed (its top level failed in a replacement worker)
    reason: str | None  # why it was refused or failed (secrets redacted)
    source: str  # NAME.py as it was
    config: str | None  # NAME.toml's text (secret references only, never values); None: no NAME.toml
    seen_by: str  # the watcher that first saw it: "HOST pid PID"


class AuditRecord(TypedDict):
    """One event of the audit trail (``audit.py``): an ``events.Event`` as stored, in a hash chain.

    ``hash`` is the SHA-256 (hex) of the record's canonical JSON without ``hash``
    (``audit_hash``); ``prev_hash`` is the previous event's ``hash`` (``GENESIS`` for seq 1).
    The store assigns ``seq``, ``prev_hash`` and ``hash`` where appends are serialised
    (``Store.append_audit``), so the chain stays one line whatever the number of writers."""

    id: str  # str(seq): the tables' identifying field
    seq: int  # 1, 2, ...: no gaps
    time: float
    action: str
    actor: str
    outcome: str
    reason: str | None
    jti: str | None
    org_id: str | None
    kid: str | None
    address: str | None
    request_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditCheckpointRecord(TypedDict):
    """A signed anchor of the chain: ``jws`` is a JWS (compact, the SSA signing key, ``kid`` in
    its header) over {"seq", "hash", "time"}: the event ``seq`` had ``hash`` at ``time``."""

    id: str  # str(seq)
    seq: int
    hash: str
    time: float
    kid: str
    jws: str
    reason: str  # "interval" (every N events or T seconds) or "retention" (the cut of a purge)


GENESIS = "0" * 64  # the prev_hash of seq 1


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def audit_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the record without ``hash``.
    (One encoder made once: ``json.dumps`` with options builds a new one per call.)"""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_ENCODER.encode(body).encode("utf-8", "surrogatepass")).hexdigest()


def chain(events: list[dict[str, Any]], head_seq: int, head_hash: str) -> list[AuditRecord]:
    """The events (an ``Event``'s fields) as records following the head (seq, hash)."""
    out: list[AuditRecord] = []
    for event in events:
        head_seq += 1
        record: dict[str, Any] = dict(event, id=str(head_seq), seq=head_seq, prev_hash=head_hash)
        record.pop("hash", None)
        record["hash"] = head_hash = audit_hash(record)
        out.append(record)  # type: ignore[arg-type]  # (built field by field above)
    return out

# Webhook deliveries' states (``webhooks.py``): pending (due at next_attempt_at, unless a node's
# lease on it runs), delivered (a 2xx), dead (webhook_max_attempts failed; ``webhooks replay``).
DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_DEAD = "pending", "delivered", "dead"
DELIVERY_STATES = (DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_DEAD)


class WebhookRecord(TypedDict):
    """A webhook subscriber (``webhooks add``): where the events of ``events`` go."""

    id: str  # "wh_<hex>"
    url: str
    events: list[str]  # actions of ``events.ACTIONS``
    # The HMAC secret: sealed under key_encryption_key ({"v", "kek", "nonce", "ciphertext"},
    # ``key_encryption.KeyEncryption.seal_text``) when one is set, else the secret itself; None: no HMAC.
    secret: str | dict[str, Any] | None
    created_at: int


class DeliveryRecord(TypedDict):
    """One event for one subscriber: a row of the outbox, written when the event happens and
    delivered (as a Security Event Token) by the server's delivery task."""

    id: str  # the delivery id: the SET's jti and the SSA-Delivery-Id header
    subscriber: str  # a WebhookRecord id
    url: str  # the subscriber's URL when the event happened (the SET's aud)
    action: str
    event: dict[str, Any]  # the event's facts (jti, org_id, kid, actor, outcome, reason, time ...)
    state: str  # one of DELIVERY_STATES
    attempts: int
    next_attempt_at: float  # epoch seconds it is due
    lease_until: float  # epoch seconds a node's claim on it runs until (0: none)
    last_error: str | None  # the last attempt's failure, one line (no body of the receiver)
    created_at: float
    delivered_at: float | None
