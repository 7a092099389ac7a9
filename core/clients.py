"""Clients of the token endpoint and the client-credentials grant (RFC 6749 §4.4).

Client secrets are 256-bit random strings, so a salted SHA-256 is enough to store them: there
is nothing to brute-force that a slow hash would protect.  The secret itself is shown once, at
creation, and never stored.  An unknown client id is checked against a dummy hash, so it takes the
time a known id with a wrong secret takes; failed authentications are throttled per client id and
per client address (``throttle.py``).  A client registered with a public key set or a jwks_uri
authenticates with a signed client assertion instead (``private_key_jwt``, ``client_assertions.py``);
a client has one method.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .client_assertions import (JWT_BEARER, PRIVATE_KEY_JWT, ClientAssertions, check_jwks_uri, public_key_set,
                                unverified_parts)
from .events import ANONYMOUS_ACTOR, CLIENT_CREATED, CLIENT_DELETED, TOKEN_REFUSED, Event, Events
from .errors import ApiError, InvalidClient, InvalidRequest, InvalidScope, SlowDown, UnsupportedGrantType
from .metrics import Metrics
from .observe import note_client
from .ssa import SSA_SCOPES
from .store import ClientRecord, Store
from .throttle import FailureThrottle, parse_networks
from .tokens import TokenAuthority


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.sha256(salt + secret.encode()).hexdigest()
    return f"sha256${salt.hex()}${digest}"


def secret_matches(secret: str, stored: str) -> bool:
    try:
        scheme, salt_hex, digest = stored.split("$")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    return scheme == "sha256" and hmac.compare_digest(hash_secret(secret, salt).split("$")[2], digest)


_DUMMY_HASH = hash_secret(secrets.token_urlsafe(32))  # what an unknown client id is checked against


class ClientService:
    def __init__(self, store: Store, tokens: TokenAuthority, clock: Callable[[], float] = time.time, *,
                 failures_per_client: int = 10, failures_per_address: int = 50,
                 failure_window: float = 60.0, trusted_proxies: tuple[str, ...] = (),
                 metrics: Metrics | None = None, assertions: ClientAssertions | None = None,
                 events: Events | None = None, actor: str = ANONYMOUS_ACTOR) -> None:
        self.store = store
        self.events = events if events is not None else Events()
        self.actor = actor  # who registers and deletes clients (the CLI's cli:<user>)
        self.metrics = metrics if metrics is not None else Metrics()
        self.tokens = tokens
        self.assertions = assertions or ClientAssertions(store, tokens.issuer, clock=clock)
        self._clock = clock
        self.by_client = FailureThrottle(failures_per_client, failure_window, clock)
        self.by_address = FailureThrottle(failures_per_address, failure_window, clock)
        self.proxies = parse_networks(trusted_proxies)  # whose X-Forwarded-For names the client

    async def create(self, scopes: list[str], name: str = "", *, jwks: Any = None,
                     jwks_uri: str | None = None) -> tuple[ClientRecord, str | None]:
        """Register a client; returns its record and the secret (shown once).  With ``jwks`` (a
        public JWK or JWK set) or ``jwks_uri`` the client uses private_key_jwt and has no secret."""
        unknown = [s for s in scopes if s not in SSA_SCOPES]
        if not scopes or unknown:
            raise ApiError(f"Scopes must be among {', '.join(SSA_SCOPES)}; "
                           f"got {', '.join(unknown) or 'none'}.", error="invalid_scope")
        if jwks is not None and jwks_uri is not None:
            raise ApiError("Give a JWK set or a jwks_uri, not both.", error="invalid_client_metadata")
        record = ClientRecord(client_id=str(uuid.uuid4()), name=name, secret_hash="",
                              scopes=sorted(set(scopes)), created_at=int(self._clock()))
        secret = None
        if jwks is not None:
            record["token_endpoint_auth_method"], record["jwks"] = PRIVATE_KEY_JWT, public_key_set(jwks)
        elif jwks_uri is not None:
            record["token_endpoint_auth_method"] = PRIVATE_KEY_JWT
            record["jwks_uri"] = check_jwks_uri(jwks_uri)
        else:
            secret = secrets.token_urlsafe(32)
            record["secret_hash"] = hash_secret(secret)
        await self.store.add_client(record)
        if self.events.wanted:
            method = record.get("token_endpoint_auth_method", "client_secret_basic")
            await self.events.emit(Event(CLIENT_CREATED, self.actor, details={
                "client_id": record["client_id"], "scopes": list(record["scopes"]),
                "token_endpoint_auth_method": method}))
        return record, secret

    async def list_clients(self) -> list[ClientRecord]:
        return await self.store.list_clients()

    async def delete(self, client_id: str) -> bool:
        deleted = await self.store.delete_client(client_id)
        self.tokens.forget_client(client_id)
        self.assertions.forget(client_id)
        if deleted and self.events.wanted:
            await self.events.emit(Event(CLIENT_DELETED, self.actor, details={"client_id": client_id}))
        return deleted

    async def authenticate(self, client_id: str, secret: str) -> ClientRecord:
        record = await self.store.get_client(client_id) if client_id else None
        # One hash either way: an unknown id must not answer faster than a wrong secret.
        matches = secret_matches(secret, record["secret_hash"] if record is not None else _DUMMY_HASH)
        if record is None or not matches or "token_endpoint_auth_method" in record:
            raise InvalidClient()
        return record

    async def token(self, form: dict[str, str], basic: tuple[str, str] | None,
                    address: Callable[[], str] = lambda: "") -> dict[str, object]:
        """The client-credentials grant: authenticate, check scopes, issue an access token.

        ``address`` finds the client's address; it is only called when a failure is counted or
        an address is being refused, so a normal request does not pay for it.  Each answer is
        counted in ``ssa_token_requests_total``: ``issued``, or the OAuth error code."""
        try:
            answer = await self._token(form, basic, address)
        except ApiError as e:
            self.metrics.token(e.error)
            if self.events.wanted:  # the id the caller claimed (never its secret or assertion)
                claimed = basic[0] if basic else form.get("client_id")
                await self.events.emit(Event(TOKEN_REFUSED, ANONYMOUS_ACTOR, outcome="refused",
                                             reason=e.error,
                                             details={"client_id": claimed[:128]} if claimed else {}))
            raise
        self.metrics.token("issued")
        return answer

    async def _token(self, form: dict[str, str], basic: tuple[str, str] | None,
                     address: Callable[[], str]) -> dict[str, object]:
        post_id, post_secret = form.get("client_id"), form.get("client_secret")
        assertion_type, assertion = form.get("client_assertion_type"), form.get("client_assertion")
        if assertion_type is not None or assertion is not None:
            if basic or post_secret is not None:
                raise InvalidRequest("Use one client authentication method, not both.")
            if assertion_type != JWT_BEARER or not assertion:
                raise InvalidRequest(f"A client assertion needs client_assertion_type={JWT_BEARER} "
                                     "and client_assertion.")
            header, claims, client_id = unverified_parts(assertion)
            if post_id is not None and post_id != client_id:
                raise InvalidClient("The client_id is not the client_assertion's sub.")
            check = lambda: self._assertion_client(client_id, header, claims, assertion)  # noqa: E731
        else:
            if basic and (post_secret is not None or (post_id is not None and post_id != basic[0])):
                raise InvalidRequest("Use one client authentication method, not both.")
            if basic:
                client_id, secret = basic
            elif post_id is not None and post_secret is not None:
                client_id, secret = post_id, post_secret
            else:
                raise InvalidClient("Client authentication is required (HTTP Basic, client_secret_post "
                                    "or private_key_jwt).")
            check = lambda: self.authenticate(client_id, secret)  # noqa: E731
        grant = form.get("grant_type")
        if not grant:
            raise InvalidRequest("The grant_type parameter is required.")
        client = await self._authenticate_throttled(client_id, address, check)
        note_client(client["client_id"])
        if grant != "client_credentials":
            raise UnsupportedGrantType()
        requested = form.get("scope", "").split()
        registered = set(client["scopes"])
        if requested and not set(requested) <= registered:
            raise InvalidScope()
        scopes = sorted(set(requested) if requested else registered)
        token, ttl = self.tokens.issue(client["client_id"], scopes)
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl, "scope": " ".join(scopes)}

    async def _assertion_client(self, client_id: str, header: dict[str, Any], claims: dict[str, Any],
                                assertion: str) -> ClientRecord:
        record = await self.store.get_client(client_id)
        if record is None:
            raise InvalidClient()
        await self.assertions.verify(record, header, claims, assertion)
        return record

    async def _authenticate_throttled(self, client_id: str, address: Callable[[], str],
                                      check: Callable[[], Awaitable[ClientRecord]]) -> ClientRecord:
        """``check`` (the secret, or the client assertion), unless this id or address failed too
        often (429 before the credentials are checked: right ones are refused too, or the throttle
        would still let guesses through)."""
        where = address() if self.by_address.blocking else None
        wait = self.by_client.retry_after(client_id)
        if where:
            wait = max(wait, self.by_address.retry_after(where))
        if wait > 0:
            raise SlowDown(wait)
        try:
            return await check()
        except InvalidClient:
            self.by_client.failed(client_id)
            self.by_address.failed(where if where is not None else address())
            raise

    async def caller_exists(self, client_id: str) -> bool:
        return await self.store.has_client(client_id)
