"""The journal's entries: one JSON line each, proven to read back as it was given, and written whole.

A line is ``{"w": writer, "t": table, "id": id, "doc": {...}}`` (no ``doc``: a delete).  Lines
are written and read by orjson; a line holding an integer beyond 64 bits is wide (``jsonvalues``)
and carries ``"j": 1``, so that replay reads it with the stdlib and gets the integer back exactly.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import orjson

from .. import jsonvalues
from .errors import UnstorableValue

_WIDE_FLAG = b',"j":1}\n'


def encode(entry: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The journal line of ``entry``, and the entry as that line holds it."""
    line, wide = jsonvalues.encode(entry, newline=True)
    if wide:  # (the flag is the line's last member, as if it had been in the entry)
        return line[:-2] + _WIDE_FLAG, dict(entry, j=1)
    return line, entry


def decode(line: bytes) -> Any:
    entry = orjson.loads(line)
    return jsonvalues.loads_wide(line) if type(entry) is dict and entry.get("j") else entry


def proven(entry: dict[str, Any]) -> bytes:
    """The journal line of ``entry``, proven to read back (``decode``) as ``entry``: what the store
    acknowledges is what replay returns (orjson writes NaN as null, the stdlib turns int keys
    into strings; both are refused here, before anything is changed)."""
    try:
        line, written = encode(entry)
        same = decode(line) == written
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError: text that is not UTF-8
        same = False
    if not same:
        raise UnstorableValue("a value would not read back from the journal as it was given "
                              "(NaN or Infinity, a key that is not a string, text that is not UTF-8)")
    return line


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written: a write may be short without raising (the
    disk filled up in the middle); the next one then raises (ENOSPC)."""
    n = os.write(fd, data)
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
