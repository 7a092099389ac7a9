"""What every store keeps: the record shapes, their statuses, their tables, and copies of them.

Records are plain JSON-ready dicts (the TypedDicts below), so every backend stores them as they
are and every caller gets copies it may change freely.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

# SSA statuses (Janssen's names).
ACTIVE, USED, REVOKED, EXPIRED = "ACTIVE", "USED", "REVOKED", "EXPIRED"
STATES = (ACTIVE, USED, REVOKED, EXPIRED)

# Key statuses: an active key signs; a retiring one only verifies (published in /jwks until its
# remove_after); a retired one is kept but never used or published.
KEY_ACTIVE, KEY_RETIRING, KEY_RETIRED = "active", "retiring", "retired"
KEY_STATES = (KEY_ACTIVE, KEY_RETIRING, KEY_RETIRED)

# Every table of every store and the field that identifies its records, in export order (the
# keys before the SSAs they signed, so an importer can verify SSAs as it goes).
ID_FIELDS = {"clients": "client_id", "keys": "kid", "templates": "name", "ssa": "jti"}
TABLES = tuple(ID_FIELDS)


class SsaRecord(TypedDict):
    jti: str  # also the JWT's jti claim
    org_id: str
    description: str
    software_id: str
    software_roles: list[str]
    grant_types: list[str]
    one_time_use: bool
    rotate_ssa: bool
    lifetime: NotRequired[int | None]
    custom: dict[str, Any]  # configured custom attributes given at creation
    created_at: int  # epoch seconds; the JWT's iat
    expiration: int  # epoch seconds; the JWT's exp (set to now on revoke)
    status: str  # one of STATES
    creator_id: str  # client_id that created it ("cli" for the operator CLI)
    iss: str  # the issuer the SSA was signed under


class ClientRecord(TypedDict):
    client_id: str
    name: str
    secret_hash: str  # "sha256$<salt hex>$<digest hex>"; the secret itself is never stored
    scopes: list[str]
    created_at: int


class KeyRecord(TypedDict):
    kid: str
    alg: str  # RS256 ... EdDSA for SSA keys, HS256 for the access-token key
    use: str  # "ssa" (signs SSAs, published in /jwks) or "token" (signs access tokens, never published)
    jwk: dict[str, Any]  # the private JWK; lives only in the store, which is 0600
    status: str  # one of KEY_STATES
    created_at: int
    remove_after: NotRequired[int | None]  # epoch seconds after which a retiring key leaves /jwks


class TemplateRecord(TypedDict):
    name: str
    fields: dict[str, Any]  # the POST /ssa body to reuse
    created_at: int


def clone(value: Any) -> Any:
    """A deep copy of a JSON value (faster than ``copy.deepcopy``: it knows only dicts and lists)."""
    if type(value) is dict:
        return {k: clone(v) for k, v in value.items()}
    if type(value) is list:
        return [clone(v) for v in value]
    return value
