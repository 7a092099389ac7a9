"""The text UI's data sources: one small interface (``Source``), two ways to reach the SSAs.

- ``HttpSource``: a running server over its HTTP API (``ssa-server tui --url``), with a
  client-credentials token from ``/token`` (admin scope), renewed before it expires and once more
  when the server answers 401 ``invalid_token``.  The standard library's ``urllib`` in a thread: no
  HTTP client dependency for one operator's requests.
- ``LocalSource``: the local data dir or store URL of the settings, through ``SsaService``
  directly (the CLI's path: ``Server.build(..., exclusive=False)``, so it works beside ``serve``).

Both raise ``ApiError`` with the API's ``error`` and ``error_description``, which the UI shows.
The active SSAs are read in pages through the admin search (``page``): keyset paging on the
search's order (created_at, then jti), so no page loads more than its size.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ApiError, InvalidRequest, NotFound
from .ssa import ADMIN, REQUEST_FIELDS
from .store.search import MAX_LIMIT

if TYPE_CHECKING:
    from .server import Server
    from .settings import Settings

TUI_CLIENT = "tui"  # the creator_id of SSAs the local text UI makes
TOKEN_MARGIN = 30  # seconds before a token's expiry when a new one is fetched


@dataclass(frozen=True)
class Cursor:
    """Where a page of the active SSAs ends: its last (created_at, jti)."""

    created_at: int
    jti: str


def _quoted(value: str) -> str:
    return json.dumps(value)  # the search language's JSON string: any text, commas included


class Source(Protocol):
    """What the screens need; every method raises ``ApiError`` with the API's text."""

    label: str  # shown in the header: the URL or the store

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def custom_attributes(self) -> tuple[str, ...]: ...
    async def search(self, where: list[str], limit: int) -> list[dict[str, Any]]: ...
    async def create(self, fields: dict[str, Any]) -> str: ...
    async def revoke(self, *, jti: str | None, org_id: str | None) -> None: ...
    async def templates(self) -> list[dict[str, Any]]: ...
    async def save_template(self, name: str, fields: dict[str, Any]) -> bool: ...
    async def delete_template(self, name: str) -> None: ...
    async def scripts(self) -> list[dict[str, Any]]: ...
    async def test_script(self, name: str, hook: str) -> dict[str, Any]: ...


async def page(source: Source, where: str, size: int, after: Cursor | None, now: int) -> list[dict[str, Any]]:
    """Up to ``size`` ACTIVE, unexpired SSAs matching ``where`` (the admin search language), after
    ``after``: the search has AND terms only, so "(created_at = T and jti > J) or created_at > T"
    is two searches, the second only when the first leaves room."""
    base = [f"status=ACTIVE, expiration>{now}"] + ([where] if where.strip() else [])
    if after is None:
        return await source.search(base, size)
    found = await source.search(base + [f"created_at={after.created_at}, jti>{_quoted(after.jti)}"], size)
    if len(found) < size:
        found += await source.search(base + [f"created_at>{after.created_at}"], size - len(found))
    return found


async def count_active(source: Source, *, jti: str | None, org_id: str | None) -> tuple[int, bool]:
    """How many ACTIVE SSAs a revoke of ``jti``/``org_id`` would change, and whether that is only a
    lower bound (the search's ``MAX_LIMIT``)."""
    terms = ["status=ACTIVE"]
    if jti:
        terms.append(f"jti={_quoted(jti)}")
    if org_id:
        terms.append(f"org_id={_quoted(org_id)}")
    found = await source.search([", ".join(terms)], MAX_LIMIT)
    return len(found), len(found) >= MAX_LIMIT


# --- over HTTP ---
class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would send the request again, Authorization header included, wherever a redirect
    points: the client's secret and tokens go to the server the operator named, nowhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class HttpSource:
    def __init__(self, url: str, client_id: str, client_secret: str, *, timeout: float = 15.0,
                 clock: Any = time.time) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"the server's URL must be http(s)://..., not {url[:80]!r}")
        self.url = url.rstrip("/")
        self.label = self.url
        self._client = (client_id, client_secret)  # never shown, never logged
        self._timeout = timeout
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0

    def __repr__(self) -> str:  # no secret in a traceback's locals
        return f"HttpSource({self.url!r})"

    async def open(self) -> None:
        await self._fresh_token()

    async def close(self) -> None:
        pass

    # the wire
    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with _OPENER.open(request, timeout=self._timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(f"Cannot reach {self.url}: {reason}", status=503,
                           error="temporarily_unavailable") from None

    async def _fresh_token(self) -> str:
        if self._token is not None and self._clock() < self._expires - TOKEN_MARGIN:
            return self._token
        pair = ":".join(urllib.parse.quote(p, safe="") for p in self._client)  # RFC 6749 §2.3.1
        basic = base64.b64encode(pair.encode()).decode()
        form = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": ADMIN}).encode()
        status, raw = await asyncio.to_thread(
            self._send, "POST", "/token", form,
            {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
        body = _json(raw)
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            raise _error(status, body)
        self._token = str(body["access_token"])
        self._expires = self._clock() + float(body.get("expires_in", 300))
        return self._token

    async def _call(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                    json_body: Any = None) -> tuple[int, Any]:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        data = None if json_body is None else json.dumps(json_body).encode()
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {await self._fresh_token()}", "Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            status, raw = await asyncio.to_thread(self._send, method, path, data, headers)
            body = _json(raw)
            expired = isinstance(body, dict) and body.get("error") == "invalid_token"
            if status == 401 and attempt == 1 and expired:
                self._token = None  # expired or revoked early: one new token, one retry
                continue
            if status >= 400:
                raise _error(status, body)
            return status, body
        raise AssertionError("unreachable")

    async def custom_attributes(self) -> tuple[str, ...]:
        """The configured custom attributes, as /openapi.json marks them in the POST /ssa body."""
        from .openapi import CUSTOM_MARK

        _, doc = await self._call("GET", "/openapi.json")
        try:
            props = doc["paths"]["/ssa"]["post"]["requestBody"]["content"]["application/json"]["schema"][
                "properties"]
        except (KeyError, TypeError):
            return ()
        return tuple(n for n, p in props.items() if isinstance(p, dict) and p.get(CUSTOM_MARK))

    async def search(self, where: list[str], limit: int) -> list[dict[str, Any]]:
        _, items = await self._call("GET", "/ssa/search",
                                    query=[("where", w) for w in where] + [("limit", str(limit))])
        return list(items)

    async def create(self, fields: dict[str, Any]) -> str:
        _, body = await self._call("POST", "/ssa", json_body=fields)
        return str(body["ssa"])

    async def revoke(self, *, jti: str | None, org_id: str | None) -> None:
        query = [(k, v) for k, v in (("jti", jti), ("org_id", org_id)) if v]
        await self._call("DELETE", "/ssa", query=query)

    async def templates(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/ssa/templates"))[1])

    async def save_template(self, name: str, fields: dict[str, Any]) -> bool:
        status, _ = await self._call("PUT", f"/ssa/templates/{urllib.parse.quote(name, safe='')}",
                                     json_body=fields)
        return status == 201

    async def delete_template(self, name: str) -> None:
        await self._call("DELETE", f"/ssa/templates/{urllib.parse.quote(name, safe='')}")

    async def scripts(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/scripts"))[1])

    async def test_script(self, name: str, hook: str) -> dict[str, Any]:
        _, body = await self._call("POST", f"/scripts/{urllib.parse.quote(name, safe='')}/test",
                                   json_body={"hook": hook})
        return dict(body)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


def _error(status: int, body: Any) -> ApiError:
    if isinstance(body, dict) and "error" in body:
        return ApiError(str(body.get("error_description", "")), status=status, error=str(body["error"]))
    return ApiError(f"The server answered {status}.", status=status, error="server_error")


# --- on the local store ---
class LocalSource:
    """The settings' store through ``SsaService``, with the scripts folder's hooks (as ``ssa create``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.label = settings.store_url.split("@")[-1] if settings.store_url else str(settings.data_dir)
        self.server: Server | None = None

    async def open(self) -> None:
        from .server import Server

        server = Server.build(self.settings, exclusive=False)
        await server.start(background=False, scripts=True, keys=True)
        self.server = server

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    @property
    def _server(self) -> Server:
        assert self.server is not None, "open() first"
        return self.server

    def _ctx(self, what: str) -> Any:
        from .service import CallContext

        return CallContext(TUI_CLIENT, frozenset({ADMIN}), "TUI", what)

    async def custom_attributes(self) -> tuple[str, ...]:
        return tuple(self.settings.custom_attributes)

    async def search(self, where: list[str], limit: int) -> list[dict[str, Any]]:
        return await self._server.service.search(self._ctx("search"), where, limit=limit)

    async def create(self, fields: dict[str, Any]) -> str:
        from .validation import check_fields, parse_create_request

        check_fields(fields)  # not JSON text: the rules of a body, as the CLI holds its flags
        request = parse_create_request(fields, self.settings.custom_attributes)
        return await self._server.service.create(request, self._ctx("create"))

    async def revoke(self, *, jti: str | None, org_id: str | None) -> None:
        await self._server.service.revoke(self._ctx("revoke"), jti=jti, org_id=org_id)

    async def templates(self) -> list[dict[str, Any]]:
        return [dict(t) for t in await self._server.service.list_templates()]

    async def save_template(self, name: str, fields: dict[str, Any]) -> bool:
        return await self._server.service.save_template(name, fields)

    async def delete_template(self, name: str) -> None:
        await self._server.service.delete_template(name)

    async def scripts(self) -> list[dict[str, Any]]:
        host = self._server.scripts
        return host.listing() if host is not None else []

    async def test_script(self, name: str, hook: str) -> dict[str, Any]:
        host = self._server.scripts
        found = await asyncio.to_thread(host.test_hook, name, hook) if host is not None else None
        if found is None:
            raise NotFound(f"no script named {name[:64]!r}")
        return found


def form_fields(values: dict[str, Any], custom: dict[str, str]) -> dict[str, Any]:
    """A create body from the form's texts: each request field by its kind (``ssa.REQUEST_FIELDS``;
    lists comma-separated, numbers as digits), empty ones left out; custom attributes as JSON when
    they read as a number, true/false/null, a list or an object, else as the text."""
    body: dict[str, Any] = {}
    for f in REQUEST_FIELDS:
        value = values.get(f.name)
        if value is None or value == "":
            continue
        if f.kind == "texts":
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            if items:
                body[f.name] = items
        elif f.kind in ("epoch", "seconds"):
            text = str(value).strip()
            if not text.lstrip("-").isdigit():
                raise InvalidRequest(f"'{f.name}' must be an integer.")
            body[f.name] = int(text)
        else:
            body[f.name] = value
    for name, text in custom.items():
        if text.strip():
            try:
                body[name] = json.loads(text)  # '"5"' is the text 5
            except ValueError:
                body[name] = text
    return body


def form_values(fields: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``form_fields`` for a template: the form's texts and flags."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, bool):
            out[name] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[name] = ", ".join(value)
        elif isinstance(value, str) and not _reads_as_json(value):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _reads_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
