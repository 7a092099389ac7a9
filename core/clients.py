"""Clients of the token endpoint and the client-credentials grant (RFC 6749 §4.4).

Client secrets are 256-bit random strings, so a salted SHA-256 is enough to store them: there
is nothing to brute-force that a slow hash would protect.  The secret itself is shown once, at
creation, and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable

from .errors import ApiError, InvalidClient, InvalidRequest, InvalidScope, UnsupportedGrantType
from .service import SSA_SCOPES
from .store import ClientRecord, Store
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


class ClientService:
    def __init__(self, store: Store, tokens: TokenAuthority, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.tokens = tokens
        self._clock = clock

    async def create(self, scopes: list[str], name: str = "") -> tuple[ClientRecord, str]:
        """Register a client; returns its record and the secret (shown once)."""
        unknown = [s for s in scopes if s not in SSA_SCOPES]
        if not scopes or unknown:
            raise ApiError(f"Scopes must be among {', '.join(SSA_SCOPES)}; got {', '.join(unknown) or 'none'}.",
                           error="invalid_scope")
        secret = secrets.token_urlsafe(32)
        record = ClientRecord(client_id=str(uuid.uuid4()), name=name, secret_hash=hash_secret(secret),
                              scopes=sorted(set(scopes)), created_at=int(self._clock()))
        await self.store.add_client(record)
        return record, secret

    async def list(self) -> list[ClientRecord]:
        return await self.store.list_clients()

    async def delete(self, client_id: str) -> bool:
        deleted = await self.store.delete_client(client_id)
        self.tokens.forget_client(client_id)
        return deleted

    async def authenticate(self, client_id: str, secret: str) -> ClientRecord:
        record = await self.store.get_client(client_id) if client_id else None
        if record is None or not secret_matches(secret, record["secret_hash"]):
            raise InvalidClient()
        return record

    async def token(self, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, object]:
        """The client-credentials grant: authenticate, check scopes, issue an access token."""
        post_id, post_secret = form.get("client_id"), form.get("client_secret")
        if basic and (post_secret is not None or (post_id is not None and post_id != basic[0])):
            raise InvalidRequest("Use one client authentication method, not both.")
        if basic:
            client_id, secret = basic
        elif post_id is not None and post_secret is not None:
            client_id, secret = post_id, post_secret
        else:
            raise InvalidClient("Client authentication is required (HTTP Basic or client_secret_post).")
        grant = form.get("grant_type")
        if not grant:
            raise InvalidRequest("The grant_type parameter is required.")
        client = await self.authenticate(client_id, secret)
        if grant != "client_credentials":
            raise UnsupportedGrantType()
        requested = form.get("scope", "").split()
        registered = set(client["scopes"])
        if requested and not set(requested) <= registered:
            raise InvalidScope()
        scopes = sorted(set(requested) if requested else registered)
        token, ttl = self.tokens.issue(client["client_id"], scopes)
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl, "scope": " ".join(scopes)}

    async def caller_exists(self, client_id: str) -> bool:
        return await self.store.has_client(client_id)
