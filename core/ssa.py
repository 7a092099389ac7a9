"""The SSA model: the fields of a create request, the stored record, its JWT claims and list element.

Each request field is declared once, on ``CreateRequest``: its type, its default, its JSON kind and
where an SSA shows it.  The rest is derived from there: the request parser
(``validation.parse_create_request``), the names a custom attribute may not take
(``RESERVED_ATTRIBUTES``, checked by ``settings``), the flags of ``ssa create`` (``cli``), the
OpenAPI request schema (``openapi``), the fields an exported SSA must hold (``transfer``), the lists
the embedded store copies for each caller (``LIST_FIELDS``), the record (``record_from_request``),
its claims (``jwt_claims``) and its ``GET /ssa`` element (``list_item``).  ``SsaRecord`` spells the
fields again for the type checker only; ``tests/test_ssa_model.py`` fails when it, or any derived
place, differs from ``CreateRequest``.
"""

# No ``from __future__ import annotations`` here: a TypedDict sees ``NotRequired`` only in evaluated
# annotations (Python 3.11), and REQUIRED_RECORD_FIELDS is read from SsaRecord.

import uuid
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal, NotRequired, TypedDict, cast

from .jsonvalues import clone
from .script_rules import SIGNER_HEADER, same
from .status_list import status_claim

ACTIVE, USED, REVOKED, EXPIRED = "ACTIVE", "USED", "REVOKED", "EXPIRED"
STATES = (ACTIVE, USED, REVOKED, EXPIRED)

ADMIN = "https://jans.io/auth/ssa.admin"
PORTAL = "https://jans.io/auth/ssa.portal"
DEVELOPER = "https://jans.io/auth/ssa.developer"
SSA_SCOPES = (ADMIN, PORTAL, DEVELOPER)

# Claims the server sets on every SSA, and the registered ones verifiers read: never custom attributes.
SERVER_CLAIMS = ("jti", "iss", "iat", "exp", "nbf", "sub", "aud", "status")

Kind = Literal["text", "texts", "boolean", "epoch", "seconds"]
"""A request field's JSON kind, which says how it is checked (``validation``), offered as a flag
(``cli``) and documented (``openapi``): ``text`` a string; ``texts`` a list of strings;
``boolean`` true or false; ``epoch`` epoch seconds, an integer or one written as a string (Janssen's
docs send ``"expiration": "1696799089"``), 0 or less meaning the default; ``seconds`` an integer of
at least 1 (less is ``invalid_ssa_metadata``, as in Janssen)."""


@dataclass(frozen=True)
class RequestField:
    """One field of a create request: how it travels and where the SSA shows it."""

    kind: Kind
    help: str  # one line: the ``ssa create`` flag's help and the OpenAPI description
    claim: bool = True  # a JWT claim of the same name
    listed: bool = True  # a member of the GET /ssa element's "ssa" object
    flag: str = ""  # the ``ssa create`` flag without its dashes (default: the name with dashes)
    off_help: str = ""  # a boolean's ``--no-FLAG`` help
    # Filled in from the CreateRequest attribute:
    name: str = ""
    default: Any = None  # the fixed default (None when it is generated per request)
    generated: bool = False  # the default is made per request; an empty value takes it too

    @property
    def optional(self) -> bool:
        """None is its default: left out of the claims and the list element while None."""
        return self.default is None and not self.generated


def _field(kind: Kind, default: Any, help: str, **where: Any) -> Any:
    spec = {"ssa": RequestField(kind, help, **where)}
    if callable(default):
        return field(default_factory=default, metadata=spec)
    return field(default=default, metadata=spec)


def new_jti() -> str:
    """An SSA's id: a random (version 4) UUID."""
    return str(uuid.uuid4())


def _new_software_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class CreateRequest:
    """A checked create request: a POST /ssa body, the flags of ``ssa create`` or a template.

    ``expiration`` None means ``expiration_in_days`` from creation.  ``custom`` holds the
    configured custom attributes the request gave (``settings.custom_attributes``).
    """

    org_id: str = _field("text", "", "the organization the software belongs to")
    description: str = _field("text", "", "free text about the SSA", claim=False)
    software_id: str = _field("text", _new_software_id, "the software's id (default: a new UUID)")
    software_roles: list[str] = _field("texts", list, "a software role (repeatable)", flag="software-role")
    grant_types: list[str] = _field("texts", list, "a grant type (repeatable)", flag="grant-type")
    # The record keeps it (the default filled in) as the JWT's exp and the element's exp/expiration.
    expiration: int | None = _field("epoch", None, "epoch seconds; <= 0 or absent: default",
                                    claim=False, listed=False)
    one_time_use: bool = _field("boolean", True, "valid for one validation (default)", claim=False,
                                off_help="reusable")
    rotate_ssa: bool = _field("boolean", True, "rotate_ssa true (default)", claim=False,
                              off_help="rotate_ssa false")
    lifetime: int | None = _field("seconds", None, "seconds")
    custom: dict[str, Any] = field(default_factory=dict)


def _request_field(f: Any) -> RequestField:
    spec: RequestField = f.metadata["ssa"]
    return replace(spec, name=f.name, flag=spec.flag or f.name.replace("_", "-"),
                   default=None if f.default is MISSING else f.default,
                   generated=f.default_factory is not MISSING)


REQUEST_FIELDS: tuple[RequestField, ...] = tuple(_request_field(f) for f in fields(CreateRequest)
                                                  if "ssa" in f.metadata)
# A record's lists: with ``custom``, its only mutable parts (what a store copies for each caller).
LIST_FIELDS = tuple(f.name for f in REQUEST_FIELDS if f.kind == "texts")
RESERVED_ATTRIBUTES = frozenset(f.name for f in REQUEST_FIELDS) | frozenset(SERVER_CLAIMS)


class StatusRef(TypedDict):
    """An SSA's entry in a Token Status List: its JWT's ``status`` claim names list and index."""

    list: str  # the list's id: ISSUER/statuslists/ID
    idx: int
    until: int  # the JWT's exp: the entry is kept (not purged) until then, whatever ``expiration`` says


class SsaRecord(TypedDict):
    """One stored SSA: the request's fields (as ``CreateRequest``), then what the server sets."""

    org_id: str
    description: str
    software_id: str
    software_roles: list[str]
    grant_types: list[str]
    expiration: int  # epoch seconds; the JWT's exp (set to now on revoke)
    one_time_use: bool
    rotate_ssa: bool
    lifetime: NotRequired[int | None]
    custom: dict[str, Any]  # configured custom attributes given at creation
    jti: str  # also the JWT's jti claim
    created_at: int  # epoch seconds; the JWT's iat
    status: str  # one of STATES
    creator_id: str  # client_id that created it ("cli" for the operator CLI)
    iss: str  # the issuer the SSA was signed under
    # The scope claim made at creation from the software_roles (``role_scope``); None: no claim.
    scope: NotRequired[str | None]
    status_list: NotRequired[StatusRef | None]  # None: issued without a status list (or before them)
    # What the create hooks changed in the JWT (``jwt_changes``), None when nothing; absent in
    # records stored before it existed.
    hook_changes: NotRequired[dict[str, Any] | None]


# What an exported SSA must hold to be imported (every field but the optional ones), in order.
REQUIRED_RECORD_FIELDS = tuple(k for k in SsaRecord.__annotations__ if k in SsaRecord.__required_keys__)


def _names(shown: list[RequestField]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The names of ``shown`` in three groups: values kept as they are, lists (copied), optional."""
    return (tuple(f.name for f in shown if f.kind != "texts" and not f.optional),
            tuple(f.name for f in shown if f.kind == "texts"),
            tuple(f.name for f in shown if f.optional))


_STORED = _names([f for f in REQUEST_FIELDS if f.kind != "epoch"])
_CLAIMED = _names([f for f in REQUEST_FIELDS if f.claim])
_LISTED = _names([f for f in REQUEST_FIELDS if f.listed])


def role_scope(roles: list[str], role_scopes: Mapping[str, tuple[str, ...]]) -> str | None:
    """The ``scope`` claim of an SSA with these ``software_roles`` (Janssen's
    ``ssaMapSoftwareRolesToScopes``): the union of the roles' mapped scopes, sorted, space-separated;
    None when the union is empty (no claim)."""
    if not role_scopes:
        return None
    scopes = {scope for role in roles for scope in role_scopes.get(role, ())}
    return " ".join(sorted(scopes)) or None


def record_from_request(request: CreateRequest, *, now: int, expiration_in_days: int, creator_id: str,
                        issuer: str, jti: str | None = None,
                        role_scopes: Mapping[str, tuple[str, ...]] | None = None,
                        status_list: tuple[str, int] | None = None) -> SsaRecord:
    """A new ACTIVE SSA for ``request``, created ``now`` by ``creator_id`` under ``issuer``; its
    ``scope`` from ``role_scopes`` (the setting ``map_software_roles_to_scopes``); ``status_list``
    (list id, index): its entry in a Token Status List."""
    values, lists, optional = _STORED
    record: dict[str, Any] = {name: getattr(request, name) for name in values}
    for name in lists:
        record[name] = list(getattr(request, name))
    for name in optional:
        record[name] = getattr(request, name)
    expiration = request.expiration or now + expiration_in_days * 86400
    record.update(expiration=expiration, custom=dict(request.custom), jti=jti or new_jti(), created_at=now,
                  status=ACTIVE, creator_id=creator_id, iss=issuer,
                  scope=role_scope(request.software_roles, role_scopes) if role_scopes else None,
                  status_list=None if status_list is None else {"list": status_list[0], "idx": status_list[1],
                                                                "until": expiration},
                  hook_changes=None)
    return cast(SsaRecord, record)  # its keys are SsaRecord's: test_ssa_model checks that they agree


def _shown(record: Mapping[str, Any], out: dict[str, Any],
           names: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    values, lists, optional = names
    for name in values:
        out[name] = record[name]
    for name in lists:
        out[name] = list(record[name])
    for name in optional:
        value = record.get(name)
        if value is not None:
            out[name] = value
    return out


def jwt_claims(record: SsaRecord) -> dict[str, Any]:
    """The claims of the SSA's JWT: the server's, the claimed request fields, the custom attributes,
    then what the create hooks changed (``hook_changes``): the claims the SSA was issued with."""
    claims = _shown(record, {"jti": record["jti"], "iat": record["created_at"], "exp": record["expiration"],
                             "iss": record["iss"]}, _CLAIMED)
    scope = record.get("scope")
    if scope is not None:
        claims["scope"] = scope
    if record["custom"]:
        claims.update(clone(record["custom"]))
    ref = record.get("status_list")
    if ref:
        claims["status"] = status_claim(status_list_uri(record["iss"], ref["list"]), ref["idx"])
    changes = record.get("hook_changes")
    if changes:
        for name in changes.get("removed_claims", ()):
            claims.pop(name, None)
        claims.update(clone(changes.get("claims", {})))
    return claims


def status_list_uri(issuer: str, list_id: str) -> str:
    """Where a Token Status List is served (``GET /statuslists/ID``): its token's ``sub``."""
    return f"{issuer}/statuslists/{list_id}"


def current_status(record: SsaRecord, now: int) -> str:
    """The status an SSA has at ``now``: an ACTIVE one past its expiration is EXPIRED even before
    the cleaner stored that."""
    status = record["status"]
    return EXPIRED if status == ACTIVE and record["expiration"] <= now else status


def status_view(record: SsaRecord, now: int) -> dict[str, Any]:
    """The GET /ssa/status body: what a consumer may learn about an SSA whose jti it holds."""
    return {"jti": record["jti"], "status": current_status(record, now), "exp": record["expiration"],
            "one_time_use": record["one_time_use"]}


def jwt_header(record: SsaRecord, typ: str) -> dict[str, Any]:
    """The SSA's JWT header without the signer's ``alg`` and ``kid``: ``typ`` (the setting
    ``jwt_typ``) and the parameters the create hooks added."""
    header: dict[str, Any] = {"typ": typ}
    changes = record.get("hook_changes")
    if changes and changes.get("header"):
        header.update(clone(changes["header"]))
    return header


def jwt_changes(header: dict[str, Any], claims: dict[str, Any], new_header: dict[str, Any],
                new_claims: dict[str, Any]) -> dict[str, Any] | None:
    """What the create hooks changed from ``header``/``claims`` (the JWT the record gives) to the
    JWT that is signed, as the record keeps it (``hook_changes``): ``header`` the parameters set
    (the signer's ``alg``/``kid`` never), ``claims`` the claims set or changed (type-strict:
    ``1.0`` replacing ``1`` is a change), ``removed_claims`` the names deleted; each only when
    not empty, None when nothing changed.  The values are the hooks' own objects (not copied)."""
    out: dict[str, Any] = {}
    set_header = {k: v for k, v in new_header.items()
                  if k not in SIGNER_HEADER and (k not in header or not same(header[k], v))}
    if set_header:
        out["header"] = set_header
    set_claims = {k: v for k, v in new_claims.items() if k not in claims or not same(claims[k], v)}
    if set_claims:
        out["claims"] = set_claims
    removed = [k for k in claims if k not in new_claims]
    if removed:
        out["removed_claims"] = removed
    return out or None


def hook_changes_problem(changes: Any) -> str | None:
    """Why ``changes`` is not a record's ``hook_changes`` (as ``jwt_changes`` makes it), or None:
    an import checks it, since GET /ssa/jwt and GET /ssa read it."""
    if changes is None:
        return None
    if type(changes) is not dict or set(changes) - {"header", "claims", "removed_claims"}:
        return "hook_changes must be null or an object of header, claims and removed_claims"
    for part in ("header", "claims"):
        if type(changes.get(part, {})) is not dict:
            return f"hook_changes.{part} must be an object"
    removed = changes.get("removed_claims", [])
    if type(removed) is not list or not all(type(name) is str for name in removed):
        return "hook_changes.removed_claims must be a list of names"
    return None


def list_item(record: SsaRecord) -> dict[str, Any]:
    """The GET /ssa element for one stored SSA (Janssen's shape)."""
    inner = _shown(record, {"iss": record["iss"], "iat": record["created_at"], "exp": record["expiration"],
                            "jti": record["jti"]}, _LISTED)
    scope = record.get("scope")
    if scope is not None:  # where the claim shows
        inner["scope"] = scope
    for name, value in record["custom"].items():
        inner.setdefault(name, clone(value))
    changes = record.get("hook_changes")
    if changes and changes.get("claims"):  # beside the custom attributes; never a model field's name
        for name, value in changes["claims"].items():
            if name not in inner and name not in RESERVED_ATTRIBUTES:
                inner[name] = clone(value)
    return {"ssa": inner, "created_at": record["created_at"], "expiration": record["expiration"],
            "iss": record["creator_id"], "status": record["status"]}
