"""A script's HTTP allow-list (``[http] allow`` in ``NAME.toml``) and the URL and address rules
the server holds ``context.http`` to (``http_broker.py`` performs the calls).

An entry is ``scheme://host[:port]/path-prefix``.  A URL is allowed when its scheme, host and
port equal an entry's and its path is the entry's path or lies under it.  Parsing is strict, so
that the text the check reads is the text the connection uses: no userinfo, no fragment, no
backslash, whitespace or control characters, no dot segments (plain or percent-encoded), a
host that is a lowercase DNS name whose last label starts with a letter, a dotted-quad IPv4
address or a bracketed IPv6 address in canonical form (``2130706433``, ``0x7f000001``,
``017700000001``, ``127.1`` and ``localhost.`` are none of these).

Addresses: a name's every resolved address must be global (``ipaddress``'s ``is_global``: not
loopback, private, link-local (the cloud metadata service), shared, reserved or unspecified),
else the call is refused.  An entry whose host is an IP literal names that address explicitly:
only then may a non-global address be reached (never the unspecified address or multicast).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from .errors import ScriptRefused

MAX_ENTRIES = 32
MAX_URL = 2048
_SCHEMES = {"http": 80, "https": 443}
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"^(?:{_LABEL}\.)*(?!-)[a-z][a-z0-9-]{{0,62}}(?<!-)$")
_PATH = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
_QUERY = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*$")
_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HttpRefused(Exception):
    """The URL or its address is not allowed: the script's call is refused (nothing connected)."""


@dataclass(frozen=True)
class AllowEntry:
    scheme: str
    host: str  # a lowercase DNS name, or an IP address's text (IPv6 without brackets)
    port: int
    path: str  # the prefix
    literal: IpAddress | None  # the host is this IP address (named explicitly)

    def covers(self, path: str) -> bool:
        prefix = self.path
        return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


@dataclass(frozen=True)
class Target:
    """An allowed URL, split as the connection uses it."""

    scheme: str
    host: str
    port: int
    target: str  # path and query: the request line's target
    entry: AllowEntry

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _SCHEMES[self.scheme] else f"{host}:{self.port}"


def parse_allow(script: str, table: Any) -> tuple[AllowEntry, ...]:
    """The ``[http]`` table of ``script``'s NAME.toml as entries; ScriptRefused if it is wrong."""
    def refuse(why: str) -> ScriptRefused:
        return ScriptRefused(f"{script}.toml: [http] {why}")

    if not isinstance(table, dict) or set(table) - {"allow"}:
        raise refuse("may only set allow")
    allow = table.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow) or len(allow) > MAX_ENTRIES:
        raise refuse(f"allow must be a list of at most {MAX_ENTRIES} URL strings")
    entries = []
    for text in allow:
        try:
            scheme, host, port, path, _ = _split(text)
        except HttpRefused as e:
            raise refuse(f"allow entry {text[:200]!r}: {e}") from None
        literal = _literal(host)
        if literal is not None and (literal.is_unspecified or literal.is_multicast):
            raise refuse(f"allow entry {text[:200]!r}: the unspecified or a multicast address")
        entries.append(AllowEntry(scheme, host, port, path, literal))
    return tuple(entries)


def match(entries: tuple[AllowEntry, ...], url: Any) -> Target:
    """The allowed target of ``url``; HttpRefused naming why not."""
    if not entries:
        raise HttpRefused("this script has no [http] allow-list")
    scheme, host, port, path, query = _split(url)
    for entry in entries:
        if entry.scheme == scheme and entry.host == host and entry.port == port and entry.covers(path):
            return Target(scheme, host, port, path + ("?" + query if query else ""), entry)
    raise HttpRefused(f"{_shown(url)} is not in this script's [http] allow-list")


def address_allowed(address: IpAddress, entry: AllowEntry) -> bool:
    """Whether a resolved (or literal) address may be connected to for ``entry``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast:
        return False
    if entry.literal is not None:
        return address == entry.literal
    return address.is_global


def _split(url: Any) -> tuple[str, str, int, str, str]:
    """scheme, host, port, path, query of a URL under the strict rules; HttpRefused if not."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise HttpRefused(f"a URL must be a string of 1 to {MAX_URL} characters")
    if not url.isascii() or not url.isprintable() or any(c in url for c in " \\#"):
        raise HttpRefused(f"{_shown(url)}: spaces, backslashes, fragments and non-ASCII are not allowed")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise HttpRefused(f"{_shown(url)}: only http:// and https:// URLs")
    authority, slash, tail = rest.partition("/")
    path_and_query = slash + tail if slash else "/"
    if "@" in authority or "?" in authority:
        raise HttpRefused(f"{_shown(url)}: userinfo (user@host) is not allowed")
    host, port = _authority(url, authority, _SCHEMES[scheme])
    path, _, query = path_and_query.partition("?")
    if not _PATH.match(path) or not _QUERY.match(query) or _DOT_SEGMENT.search(path) or "%2f" in path.lower():
        raise HttpRefused(f"{_shown(url)}: the path holds dot segments or characters that are not allowed")
    return scheme, host, port, path, query


def _authority(url: str, authority: str, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):
        inner, bracket, after = authority[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise HttpRefused(f"{_shown(url)}: a malformed IPv6 host")
        host, port_text = inner, after[1:] if after else None
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpRefused(f"{_shown(url)}: a malformed IPv6 host") from None
        if str(address) != host:
            raise HttpRefused(f"{_shown(url)}: an IPv6 host must be in canonical form ({address})")
    else:
        host, colon, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if colon else None
        if not _is_dotted_quad(host) and not _HOSTNAME.match(host):
            raise HttpRefused(f"{_shown(url)}: the host is neither a DNS name nor a dotted-quad IPv4 address")
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise HttpRefused(f"{_shown(url)}: the port is not 1-65535")
        port = int(port_text)
    return host, port


def _is_dotted_quad(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _shown(url: Any) -> str:
    """The URL as an error shows it: printable, short, without its query (it may hold a key)."""
    text = str(url).split("?", 1)[0][:200]
    return repr("".join(c if c.isprintable() else "?" for c in text))
