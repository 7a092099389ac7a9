"""The SSA service: every business rule of create, list, get-JWT, validate and revoke.

HTTP handlers and the CLI both call this layer; neither holds rules of its own.  Data flows one
way: checked input -> service -> hooks -> signing -> store -> result.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import pluggy

from .errors import ApiError, InvalidJti, InvalidRequest, NothingToRevoke, NotAcceptable, ScriptFailed
from .keys import KeyRing
from .settings import Settings
from .store import ACTIVE, SsaRecord, Store, UnstorableValue, clone
from .validation import CreateRequest
from ssa_server.plugins.hookspecs import JwtDraft
from ssa_server.plugins.script_rules import SIGNER_HEADER, create_change
from ssa_server.plugins.scripts import ScriptHost

log = logging.getLogger("ssa_server.service")

ADMIN = "https://jans.io/auth/ssa.admin"
PORTAL = "https://jans.io/auth/ssa.portal"
DEVELOPER = "https://jans.io/auth/ssa.developer"
SSA_SCOPES = (ADMIN, PORTAL, DEVELOPER)


class _Uuid4Source:
    """uuid4 strings from a buffer of ``os.urandom`` (one getrandom call per 256 ids instead of
    one per id).  Thread-safe, and the buffer is dropped in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer, self._pos, self._pid = b"", 0, 0

    def __call__(self) -> str:
        with self._lock:
            if self._pos >= len(self._buffer) or self._pid != os.getpid():
                self._buffer, self._pos, self._pid = os.urandom(4096), 0, os.getpid()
            raw = self._buffer[self._pos:self._pos + 16]
            self._pos += 16
        # RFC 9562 version 4: version nibble 4, variant bits 10 (what uuid.UUID(version=4) sets).
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}

new_jti = _Uuid4Source()

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
    raw_headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()  # as the ASGI scope has them

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
    def __init__(self, settings: Settings, store: Store, keys: KeyRing, plugins: pluggy.PluginManager,
                 clock: Callable[[], float] = time.time, scripts: ScriptHost | None = None) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.plugins = plugins
        self._clock = clock
        self._scripts = scripts
        self._without_scripts: dict[str, Any] = {}  # hook name -> its caller minus the script chain

    def now(self) -> int:
        return int(self._clock())

    # --- create ---
    async def create(self, request: CreateRequest, ctx: CallContext) -> str:
        """Build, post-process (hooks), sign and store a new SSA; returns the compact JWT.

        Nothing is stored when a hook refuses or fails, or when signing fails.
        """
        now = self.now()
        expiration = request.expiration or now + self.settings.expiration_in_days * 86400
        record = SsaRecord(
            jti=new_jti(), org_id=request.org_id, description=request.description,
            software_id=request.software_id, software_roles=list(request.software_roles),
            grant_types=list(request.grant_types), one_time_use=request.one_time_use,
            rotate_ssa=request.rotate_ssa, lifetime=request.lifetime, custom=dict(request.custom),
            created_at=now, expiration=expiration, status=ACTIVE, creator_id=ctx.client_id,
            iss=self.settings.issuer,
        )
        await self.keys.refresh_if_due()
        active = self.keys.active()
        header = {"typ": "jwt", "alg": active["alg"], "kid": active["kid"]}
        claims = self.jwt_claims(record)
        draft = JwtDraft(header, claims)
        if self._has_hooks("ssa_create"):  # else only the built-in no-op: nothing can change it
            draft = JwtDraft(clone(header), clone(claims))
            await self._run_hook("ssa_create", jwt=draft, context=ctx.for_hook("create", self.settings))
            self._check_protected(header, claims, draft)
        try:
            token = await self._sign(draft.header, draft.claims)
        except (TypeError, ValueError) as e:
            raise ScriptFailed(f"a create hook produced claims that cannot be signed: {type(e).__name__}") from None
        try:
            await self.store.add_ssa(record)
        except UnstorableValue as e:  # the request's checks refuse these first; never a 500 anyway
            raise InvalidRequest(f"A value of the request cannot be stored exactly: {e}.") from None
        log.debug("ssa created jti=%s org_id=%s client_id=%s", record["jti"], record["org_id"], ctx.client_id)
        return token

    @staticmethod
    def jwt_claims(record: SsaRecord) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "jti": record["jti"], "iat": record["created_at"], "exp": record["expiration"],
            "iss": record["iss"], "software_id": record["software_id"], "org_id": record["org_id"],
            "software_roles": list(record["software_roles"]), "grant_types": list(record["grant_types"]),
        }
        if record.get("lifetime") is not None:
            claims["lifetime"] = record["lifetime"]
        if record["custom"]:
            claims.update(clone(record["custom"]))
        return claims

    @staticmethod
    def _check_protected(header: dict[str, Any], claims: dict[str, Any], draft: JwtDraft) -> None:
        """The worker checked each script already; this holds for every hook (trusted plugins
        included) and does not trust the worker."""
        broken = create_change(header, claims, draft.header, draft.claims)
        if broken is not None:
            raise ScriptFailed(f"a create hook broke the signing rules: {broken}.")

    async def _sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """The key ring signs (``KeyRing.sign`` picks thread, helper or inline); the signer's own
        header parameters (``alg``, ``kid``) come from the active key, never from a hook."""
        return await self.keys.sign({k: v for k, v in header.items() if k not in SIGNER_HEADER}, claims)

    # --- list ---
    async def list(self, ctx: CallContext, *, jti: str | None = None, org_id: str | None = None) -> list[dict[str, Any]]:
        """ACTIVE, unexpired SSAs matching the filters; developer-only callers see their own."""
        creator = None
        if DEVELOPER in ctx.scopes and not ctx.scopes & {ADMIN, PORTAL}:
            creator = ctx.client_id
        now = self.now()
        records = await self.store.find_ssas(jti=jti or None, org_id=org_id, status=ACTIVE, creator_id=creator)
        items = [self.list_item(r) for r in records if r["expiration"] > now]
        if not items or not self._has_hooks("ssa_get"):
            return items  # nothing can change the list: skip the copy
        edited = clone(items)
        result = await self._run_hook("ssa_get", ssa_list=edited, context=ctx.for_hook("get", self.settings))
        if result is False:
            return items  # Janssen: a get hook answering false discards the list changes
        if not isinstance(edited, list):
            raise ScriptFailed("a get hook left the SSA list in an invalid state.")
        return edited

    @staticmethod
    def list_item(record: SsaRecord) -> dict[str, Any]:
        """The GET /ssa element for one stored SSA (Janssen's shape)."""
        inner: dict[str, Any] = {
            "org_id": record["org_id"], "software_id": record["software_id"],
            "software_roles": list(record["software_roles"]), "grant_types": list(record["grant_types"]),
            "iss": record["iss"], "iat": record["created_at"], "exp": record["expiration"],
            "jti": record["jti"], "description": record["description"],
            "one_time_use": record["one_time_use"], "rotate_ssa": record["rotate_ssa"],
        }
        if record.get("lifetime") is not None:
            inner["lifetime"] = record["lifetime"]
        for name, value in record["custom"].items():
            inner.setdefault(name, clone(value))
        return {"ssa": inner, "created_at": record["created_at"], "expiration": record["expiration"],
                "iss": record["creator_id"], "status": record["status"]}

    # --- get JWT ---
    async def get_jwt(self, jti: str | None) -> str:
        """The stored SSA re-signed with the active key (create hooks do not run)."""
        record = await self.store.get_ssa(jti) if jti else None
        if record is None or record["status"] != ACTIVE or record["expiration"] <= self.now():
            raise InvalidJti()
        await self.keys.refresh_if_due()
        return await self._sign({"typ": "jwt"}, self.jwt_claims(record))

    # --- validate ---
    async def validate(self, jti: str | None) -> None:
        """Succeeds for an existing, ACTIVE, unexpired SSA; a one-time SSA becomes USED, atomically."""
        if not jti or await self.store.mark_used(jti, self.now()) is None:
            raise InvalidJti()

    # --- revoke ---
    async def revoke(self, ctx: CallContext, *, jti: str | None = None, org_id: str | None = None) -> list[SsaRecord]:
        """REVOKED (expiration = now) for every ACTIVE SSA matching jti and/or org_id."""
        if not jti and not org_id:
            raise NotAcceptable()
        revoked = await self.store.revoke_ssas(jti=jti or None, org_id=org_id or None, now=self.now())
        if not revoked:
            raise NothingToRevoke()
        log.info("ssa revoked count=%d client_id=%s", len(revoked), ctx.client_id)
        items = [self.list_item(r) for r in revoked]
        try:
            await self._run_hook("ssa_revoke", ssa_list=items, context=ctx.for_hook("revoke", self.settings))
        except Exception as e:  # the revocation stands whatever a hook does
            log.error("revoke hook failed: %s: %s", type(e).__name__, e)
        return revoked

    # --- hooks ---
    def _has_hooks(self, name: str) -> bool:
        """True when something besides the built-in no-op implements the hook."""
        return len(getattr(self.plugins.hook, name).get_hookimpls()) > 1

    async def _run_hook(self, name: str, **kwargs: Any) -> Any:
        caller: Any = getattr(self.plugins.hook, name)
        try:
            chain = self._scripts.serving_chain() if self._scripts is not None else None
            if chain is not None:
                # The scripts run first (as pluggy would run the tryfirst chain), on the event
                # loop: their sandbox round trips need no thread.  Then the other plugins.
                hook = name.removeprefix("ssa_")
                data = kwargs["jwt"] if hook == "create" else kwargs["ssa_list"]
                if await chain.run_async(hook, data, kwargs["context"]) is False:
                    return False
                caller = self._without_scripts.get(name)
                if caller is None:  # it filters the implementations at each call: safe to keep
                    caller = self._without_scripts[name] = self.plugins.subset_hook_caller(name, [chain])
            if len(caller.get_hookimpls()) <= 1:  # only the built-in no-op is left: it would return None
                return None
            return await anyio.to_thread.run_sync(lambda: caller(**kwargs))
        except ApiError:
            raise
        except Exception as e:
            if name == "ssa_revoke":
                raise
            if self.settings.on_script_error == "skip":
                log.error("%s hook failed, skipped: %s: %s", name, type(e).__name__, e)
                return None
            raise ScriptFailed(f"{name} hook failed: {type(e).__name__}") from None

    # --- templates (operator CLI) ---
    async def save_template(self, name: str, fields: dict[str, Any]) -> None:
        fields = json.loads(json.dumps(fields, allow_nan=False))
        await self.store.put_template({"name": name, "fields": fields, "created_at": self.now()})

    async def template_fields(self, name: str) -> dict[str, Any]:
        record = await self.store.get_template(name)
        if record is None:
            raise ApiError(f"No template named '{name}'.", status=404, error="not_found")
        return dict(record["fields"])
