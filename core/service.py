"""The SSA service: every business rule of create, list, get-JWT, validate and revoke.

HTTP handlers and the CLI both call this layer; neither holds rules of its own.  Data flows one
way: checked input -> service -> hooks -> signing -> store -> result.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import (ApiError, FeatureDisabled, InvalidJti, InvalidRequest, NotFound, NothingToRevoke,
                     NotAcceptable, ScriptFailed, ServiceUnavailable, SlowDown, UnknownJti)
from . import jsonvalues
from .events import (ANONYMOUS_ACTOR, SSA_CREATED, SSA_JWT_READ, SSA_REVOKED, SSA_USED, SSA_VALIDATION_FAILED,
                     TEMPLATE_DELETED, TEMPLATE_SAVED, Event, Events)
from .jsonvalues import clone
from .jwt_draft import JwtDraft
from .keys import KeyRing
from .metrics import Metrics
from .script_rules import SIGNER_HEADER, create_change
from .settings import Settings
from .signers import SigningBackendError
from .ssa import (ACTIVE, ADMIN, DEVELOPER, PORTAL, REQUEST_FIELDS, REVOKED, USED, CreateRequest, SsaRecord,
                  jwt_changes, jwt_claims, jwt_header, list_item, record_from_request, status_view)
from .status_issuer import StatusIssuer
from .store import Store, TemplateRecord, UnstorableValue
from .store.search import DEFAULT_LIMIT, MAX_LIMIT, FilterError, parse as parse_filter
from .throttle import FailureThrottle
from .validation import check_fields, parse_create_request

if TYPE_CHECKING:
    from ssa_server.plugins.hooks import HookRunner

log = logging.getLogger("ssa_server.service")


_HIDDEN_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# Headers that carry credentials by their name: tokens and sessions a proxy or a gateway adds
# (oauth2-proxy's x-forwarded-access-token and x-auth-request-*, AWS ALB's x-amzn-oidc-*, IAP's
# jwt assertion), API keys, secrets, passwords.  "_" counts as "-" (uvicorn passes both).
_CREDENTIAL_NAME = re.compile(r"token|secret|passw|api-?key|session|credential|cookie|jwt|assertion"
                              r"|^x-amzn-oidc-|^x-auth-request-")


@functools.lru_cache(maxsize=1024)
def _script_header_name(raw: bytes) -> str | None:
    """The header's name as scripts see it, or None when scripts must not see it.  Cached: a
    server sees few distinct names, and the cache is bounded against a client sending many."""
    name = raw.decode("latin-1").lower()
    if name in _HIDDEN_HEADERS or _CREDENTIAL_NAME.search(name.replace("_", "-")):
        return None
    return name


@dataclass(frozen=True)
class CallContext:
    """Plain facts about the request, handed (as a copy) to hooks."""

    client_id: str
    scopes: frozenset[str]
    method: str = ""
    path: str = ""
    # as the ASGI scope has them
    raw_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()
    actor: str | None = None  # who the audit trail names (None: client_id); a CLI command's cli:<user>

    @property
    def audit_actor(self) -> str:
        return self.actor or self.client_id

    def headers(self) -> dict[str, str]:
        """The request headers for hooks, without the ones that carry credentials (Authorization,
        Cookie, tokens, keys, sessions: ``_script_header_name``); decoded only when a hook runs."""
        out = {}
        for key, value in self.raw_headers:
            name = _script_header_name(key)
            if name is not None:
                out[name] = value.decode("latin-1")
        return out

    def for_hook(self, hook: str, settings: Settings) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "scopes": sorted(self.scopes),
            "hook": hook,
            "settings": {"issuer": settings.issuer, "signing_alg": settings.signing_alg,
                         "expiration_in_days": settings.expiration_in_days,
                         "custom_attributes": list(settings.custom_attributes)},
            "request": {"method": self.method, "path": self.path, "headers": self.headers()},
        }


class SsaService:
    def __init__(self, settings: Settings, store: Store, keys: KeyRing, hooks: HookRunner,
                 clock: Callable[[], float] = time.time, status_lists: StatusIssuer | None = None,
                 metrics: Metrics | None = None, events: Events | None = None,
                 actor: str = ANONYMOUS_ACTOR) -> None:
        """``events``: where what happened is said (the audit trail, webhooks); ``actor``: who
        acted when no caller is given (the CLI's ``cli:<user>``)."""
        self.settings = settings
        self.events = events if events is not None else Events()
        self.actor = actor
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self.keys = keys
        self.status_lists = (status_lists if status_lists is not None
                             else StatusIssuer(settings, store, keys, clock))
        self.hooks = hooks  # scripts, then trusted plugins
        self._clock = clock
        # Unknown jtis asked by one address (GET /ssa/status needs no token): counted like /token's failures.
        self.status_failures = FailureThrottle(settings.status_failures_per_address,
                                               settings.token_failure_window, clock)

    def now(self) -> int:
        return int(self._clock())

    def require_enabled(self) -> None:
        """The ``ssa`` feature flag (``enabled``): while it is off, every SSA operation of this service
        refuses (403 ``access_denied``), over HTTP and in the CLI alike.  HTTP handlers also ask
        before they check the token, since Janssen checks the flag first."""
        if not self.settings.enabled:
            raise FeatureDisabled()

    # --- create ---
    async def create(self, request: CreateRequest, ctx: CallContext) -> str:
        """Build, post-process (hooks), sign and store a new SSA; returns the compact JWT.

        Nothing is stored when a hook refuses or fails, or when signing fails.
        """
        self.require_enabled()
        settings = self.settings
        entry = await self.status_lists.allocate() if settings.status_list else None
        record = record_from_request(request, now=self.now(), expiration_in_days=settings.expiration_in_days,
                                     creator_id=ctx.client_id, issuer=settings.issuer, status_list=entry,
                                     role_scopes=settings.map_software_roles_to_scopes)
        await self.keys.refresh_if_due()
        active = self.keys.active()
        header = dict(jwt_header(record, settings.jwt_typ), alg=active["alg"], kid=active["kid"])
        claims = jwt_claims(record)
        draft = JwtDraft(header, claims)
        if self.hooks.wanted("create"):  # else nothing can change it: no copies
            draft = JwtDraft(clone(header), clone(claims))
            await self.hooks.create(draft, ctx.for_hook("create", self.settings))
            self._check_protected(header, claims, draft)
            record["hook_changes"] = self._hook_changes(header, claims, draft)
        try:
            token = await self._sign(draft.header, draft.claims)
        except (TypeError, ValueError) as e:
            raise ScriptFailed("a create hook produced claims that cannot be signed: "
                               f"{type(e).__name__}") from None
        try:
            await self.store.add_ssa(record)
        except UnstorableValue as e:  # the request's checks refuse these first; never a 500 anyway
            raise InvalidRequest(f"A value of the request cannot be stored exactly: {e}.") from None
        self.metrics.issue(active["alg"])
        if self.events.wanted:
            await self.events.emit(Event(SSA_CREATED, ctx.audit_actor, jti=record["jti"],
                                         org_id=record["org_id"], kid=active["kid"],
                                         details={"software_id": record["software_id"],
                                                  "one_time_use": record["one_time_use"],
                                                  "expiration": record["expiration"]}))
        log.debug("ssa created jti=%s org_id=%s client_id=%s", record["jti"], record["org_id"], ctx.client_id)
        return token

    @staticmethod
    def _check_protected(header: dict[str, Any], claims: dict[str, Any], draft: JwtDraft) -> None:
        """The worker checked each script already; this holds for every hook (trusted plugins
        included) and does not trust the worker."""
        broken = create_change(header, claims, draft.header, draft.claims)
        if broken is not None:
            raise ScriptFailed(f"a create hook broke the signing rules: {broken}.")

    def _hook_changes(self, header: dict[str, Any], claims: dict[str, Any],
                      draft: JwtDraft) -> dict[str, Any] | None:
        """What the hooks changed, as the record keeps it (``ssa.jwt_changes``): GET /ssa/jwt signs
        the same header and claims again.  Held to what every store keeps exactly (``jsonvalues``)
        and to the script output cap, checked here since trusted plugins have no cap of their own."""
        changes = jwt_changes(header, claims, draft.header, draft.claims)
        if changes is None:
            return None
        try:
            jsonvalues.check(changes)
        except jsonvalues.JsonValueError as e:
            raise ScriptFailed(f"a create hook added a value that cannot be stored: the value {e}.") from None
        cap = self.settings.script_output_kb * 1024
        if len(jsonvalues.dumps(changes)) > cap:
            raise ScriptFailed(f"a create hook added more than {cap} bytes to the SSA "
                               "(script_output_kb).") from None
        return changes

    async def _sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """The key ring signs (``KeyRing.sign`` picks thread, helper or inline); the signer's own
        header parameters (``alg``, ``kid``) come from the active key, never from a hook."""
        try:
            return await self.keys.sign({k: v for k, v in header.items() if k not in SIGNER_HEADER}, claims)
        except SigningBackendError as e:  # a token unplugged, out of sessions: nothing is stored
            log.error("%s", e)
            raise ServiceUnavailable("The signing key is not available; retry later.") from None

    # --- list ---
    async def list_ssas(self, ctx: CallContext, *, jti: str | None = None,
                        org_id: str | None = None) -> list[dict[str, Any]]:
        """ACTIVE, unexpired SSAs matching the filters; developer-only callers see their own."""
        self.require_enabled()
        creator = None
        if DEVELOPER in ctx.scopes and not ctx.scopes & {ADMIN, PORTAL}:
            creator = ctx.client_id
        now = self.now()
        records = await self.store.find_ssas(jti=jti or None, org_id=org_id, status=ACTIVE,
                                             creator_id=creator)
        items = [list_item(r) for r in records if r["expiration"] > now]
        if not items or not self.hooks.wanted("get"):
            return items  # nothing can change the list: skip the copy
        edited = clone(items)
        if await self.hooks.get(edited, ctx.for_hook("get", self.settings)) is False:
            return items  # Janssen: a get hook answering false discards the list changes
        if not isinstance(edited, list):
            raise ScriptFailed("a get hook left the SSA list in an invalid state.")
        return edited

    # --- search (admins: HTTP and CLI) ---
    async def search(self, ctx: CallContext, where: str | Sequence[str] = (), *,
                     limit: int | None = None) -> list[dict[str, Any]]:
        """Stored SSAs of any status whose every filter term holds (``store/search.py``), oldest
        first, at most ``limit`` (None: ``DEFAULT_LIMIT``), in GET /ssa's element shape.
        No hook runs: this is the operators' view of the store, not Janssen's list."""
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"'limit' must be from 1 to {MAX_LIMIT}.")
        try:
            terms = parse_filter(where, self.settings.custom_attributes)
        except FilterError as e:
            raise InvalidRequest(str(e)) from None
        records = await self.store.search_ssas(terms, limit)
        log.debug("ssa search terms=%d found=%d client_id=%s", len(terms.terms), len(records), ctx.client_id)
        return [list_item(r) for r in records]

    # --- get JWT ---
    async def get_jwt(self, jti: str | None, actor: str | None = None) -> str:
        """The stored SSA re-signed with the active key (create hooks do not run): the header and
        claims it was created with, what the create hooks changed included (``hook_changes``)."""
        self.require_enabled()
        record = await self.store.get_ssa(jti) if jti else None
        if record is None or record["status"] != ACTIVE or record["expiration"] <= self.now():
            raise InvalidJti()
        await self.keys.refresh_if_due()
        token = await self._sign(jwt_header(record, self.settings.jwt_typ), jwt_claims(record))
        if self.events.wanted:
            await self.events.emit(Event(SSA_JWT_READ, actor or self.actor, jti=record["jti"],
                                         org_id=record["org_id"], kid=self.keys.active()["kid"]))
        return token

    # --- validate ---
    async def validate(self, jti: str | None, actor: str | None = None) -> None:
        """Succeeds for an existing, ACTIVE, unexpired SSA; a one-time SSA becomes USED, atomically."""
        self.require_enabled()
        used = await self.store.mark_used(jti, self.now()) if jti else None
        self.metrics.validation(used is not None)
        if self.events.wanted:
            await self._validated(jti, used, actor or self.actor)
        if used is None:
            raise InvalidJti()

    async def _validated(self, jti: str | None, used: SsaRecord | None, actor: str) -> None:
        if used is not None:
            await self.events.emit(Event(SSA_USED, actor, jti=used["jti"], org_id=used["org_id"],
                                         details={"one_time_use": used["one_time_use"]}))
            return
        record = await self.store.get_ssa(jti) if jti else None  # (the failure path only) why
        reason = ("unknown" if record is None else "used" if record["status"] == USED
                  else "revoked" if record["status"] == REVOKED else "expired")
        await self.events.emit(Event(SSA_VALIDATION_FAILED, actor, outcome="refused", reason=reason,
                                     jti=record["jti"] if record is not None else None,
                                     org_id=record["org_id"] if record is not None else None))

    # --- status (no token: the consumers' question, never a change) ---
    async def status(self, jti: str | None, address: Callable[[], str] = lambda: "") -> dict[str, Any]:
        """The SSA's status (``ssa.status_view``); nothing is stored or changed, so a one-time SSA
        stays ACTIVE however often it is asked about.  ``address`` finds the caller's address; it is
        only called when an unknown jti is counted or an address is being refused (429)."""
        self.require_enabled()
        if not jti:
            raise InvalidRequest("The query parameter 'jti' is required.")
        where = address() if self.status_failures.blocking else None
        if where:
            wait = self.status_failures.retry_after(where)
            if wait > 0:
                raise SlowDown(wait, "Too many unknown jtis asked from this address; retry later.")
        record = await self.store.get_ssa(jti)
        if record is None:
            self.status_failures.failed(where if where is not None else address())
            raise UnknownJti()
        return status_view(record, self.now())

    # --- revoke ---
    async def revoke(self, ctx: CallContext, *, jti: str | None = None,
                     org_id: str | None = None) -> list[SsaRecord]:
        """REVOKED (expiration = now) for every ACTIVE SSA matching jti and/or org_id."""
        self.require_enabled()
        if not jti and not org_id:
            raise NotAcceptable()
        revoked = await self.store.revoke_ssas(jti=jti or None, org_id=org_id or None, now=self.now())
        if not revoked:
            raise NothingToRevoke()
        self.metrics.revocations(len(revoked))
        log.info("ssa revoked count=%d client_id=%s", len(revoked), ctx.client_id)
        if self.events.wanted:
            await self.events.emit(*(Event(SSA_REVOKED, ctx.audit_actor, jti=r["jti"], org_id=r["org_id"])
                                     for r in revoked))
        if self.hooks.wanted("revoke"):  # never raises: the revocation stands whatever a hook does
            items = [list_item(r) for r in revoked]
            await self.hooks.revoke(items, ctx.for_hook("revoke", self.settings))
        return revoked

    # --- templates (HTTP /ssa/templates, the CLI, the text UI) ---
    def template_body(self, fields: Any) -> dict[str, Any]:
        """What a template keeps of ``fields``: checked exactly as a create body is
        (``validation.parse_create_request``: the same 400 texts), then the given request fields and
        configured custom attributes as they came; unknown keys (ignored by a create) are dropped."""
        if not isinstance(fields, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        check_fields(fields)
        parse_create_request(fields, self.settings.custom_attributes)
        kept = {f.name for f in REQUEST_FIELDS} | set(self.settings.custom_attributes)
        return {k: v for k, v in fields.items() if k in kept and v is not None}

    async def save_template(self, name: str, fields: dict[str, Any], actor: str | None = None) -> bool:
        """Save (or replace) the template ``name``; True when it is new."""
        self.require_enabled()
        check_template_name(name)
        body = clone(self.template_body(fields))
        created = await self.store.get_template(name) is None
        await self.store.put_template({"name": name, "fields": body, "created_at": self.now()})
        log.info("template saved name=%s", name)
        if self.events.wanted:
            await self.events.emit(Event(TEMPLATE_SAVED, actor or self.actor, details={"name": name}))
        return created

    async def template_fields(self, name: str) -> dict[str, Any]:
        self.require_enabled()
        record = await self.store.get_template(name)
        if record is None:
            raise ApiError(f"No template named '{name}'.", status=404, error="not_found")
        return dict(record["fields"])

    async def list_templates(self) -> list[TemplateRecord]:
        """Every saved template (name, fields, created_at: when it was last saved), oldest first."""
        self.require_enabled()
        return await self.store.list_templates()

    async def delete_template(self, name: str, actor: str | None = None) -> None:
        self.require_enabled()
        check_template_name(name)
        if not await self.store.delete_template(name):
            raise NotFound(f"No template named '{name}'.")
        log.info("template deleted name=%s", name)
        if self.events.wanted:
            await self.events.emit(Event(TEMPLATE_DELETED, actor or self.actor, details={"name": name}))


TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_template_name(name: str) -> None:
    """A template's name goes in a URL path and a file-like listing: 1-64 ASCII letters, digits,
    '.', '_' or '-', starting with a letter or digit."""
    if not TEMPLATE_NAME.fullmatch(name):
        raise InvalidRequest("A template name is 1 to 64 letters, digits, '.', '_' or '-' (ASCII), "
                             "starting with a letter or a digit.")
