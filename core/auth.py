"""Bearer-token authentication and scope checks for the SSA routes (RFC 6750)."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_plus

from starlette.requests import Request

from .clients import ClientService
from .errors import InsufficientScope, InvalidClient, InvalidToken, MissingToken
from .observe import note_client
from .tokens import Caller, TokenAuthority
from .validation import storable


async def authenticate(request: Request, tokens: TokenAuthority, clients: ClientService,
                       allowed_scopes: tuple[str, ...]) -> Caller:
    """The caller, if the request carries a valid token holding one of ``allowed_scopes``."""
    header = request.headers.get("authorization")
    if not header:
        raise MissingToken()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("Use an Authorization: Bearer access token.")
    caller = await tokens.caller(token)
    note_client(caller.client_id)
    # An external server's client is not registered here: its tokens are its server's business.
    if not caller.external and not await clients.caller_exists(caller.client_id):
        raise InvalidToken("The client of this access token no longer exists.")
    if not caller.scopes & set(allowed_scopes):
        raise InsufficientScope(list(allowed_scopes))
    return caller


def basic_credentials(request: Request) -> tuple[str, str] | None:
    """Client id and secret from HTTP Basic (form-urlencoded, RFC 6749 §2.3.1), if given."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise InvalidClient("Unsupported Authorization scheme at the token endpoint.")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("Malformed HTTP Basic credentials.") from None
    client_id, sep, secret = decoded.partition(":")
    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    if not sep or not (storable(client_id) and storable(secret)):
        raise InvalidClient("Malformed HTTP Basic credentials.")
    return client_id, secret
