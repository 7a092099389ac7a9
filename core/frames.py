"""Length-prefixed JSON frames over pipes: what the server and its helper processes (the signing
helper, the sandbox workers) say to each other.  JSON, never pickle: a broken-out worker must not
be able to make the server run code.  A frame is a 4-byte big-endian length and the JSON text.

Both sides of a helper import this module; the helper side needs nothing else of the server's
process machinery (``helper_process.py``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import orjson

_HEADER = struct.Struct(">I")
PIPE_SAFE = 60 << 10  # a frame this small fits in an empty pipe buffer (64 KiB on Linux): written at once
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class FrameError(Exception):
    """The peer closed the pipe, or sent a frame that is too large or not JSON."""


class LoneSurrogate(ValueError):
    """A string in the JSON text is not valid Unicode (an escaped lone surrogate)."""


def dumps(value: Any) -> bytes:
    """JSON text of a plain JSON value; orjson, or the stdlib behind a leading space for the
    integers beyond 64 bits that orjson refuses (and would read back as floats)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return b" " + json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes) -> Any:
    """The value of a JSON text; ValueError if it is not JSON or holds a string that is not
    valid Unicode (orjson refuses lone surrogates itself; the stdlib path is checked here)."""
    if data[:1] != b" ":
        return orjson.loads(data)
    value = json.loads(data)
    if _SURROGATE_ESCAPE.search(data) and has_lone_surrogate(value):
        raise LoneSurrogate("a string holds a lone surrogate (not valid Unicode)")
    return value


def valid_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (it has no UTF-8 form)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def has_lone_surrogate(value: Any) -> bool:
    """True if a string (or key) anywhere in a JSON value is not valid Unicode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if not valid_unicode(item):
                return True
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return False


def write_frame(fd: int, message: Any) -> None:
    write_raw_frame(fd, dumps(message))


def write_raw_frame(fd: int, data: bytes) -> None:
    """A frame whose JSON text is already made (the worker serialises results once)."""
    buf = _HEADER.pack(len(data)) + data
    while buf:
        written = os.write(fd, buf)
        buf = buf[written:]


def read_ready(fd: int) -> bytes | None:
    """What a non-blocking pipe holds now: ``b""`` once the peer closed it, None if nothing yet.
    At most 64 KiB per read: a larger buffer is a fresh mmap per read."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class FrameBuffer:
    """Frames collected from reads of a pipe, which may split a frame or join several."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._data += chunk

    def next_size(self) -> int | None:
        """The size the next frame declares, once its header is in."""
        return _HEADER.unpack_from(self._data)[0] if len(self._data) >= _HEADER.size else None

    def pop(self) -> bytes | None:
        """The next frame's JSON text, once all of it is in."""
        size = self.next_size()
        if size is None or len(self._data) < _HEADER.size + size:
            return None
        frame = bytes(self._data[_HEADER.size:_HEADER.size + size])
        del self._data[:_HEADER.size + size]
        return frame


def read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise FrameError("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int) -> Any:
    """One frame's value (see ``read_frame_bytes``)."""
    try:
        return loads(read_frame_bytes(fd, max_bytes))
    except ValueError as e:
        raise FrameError(str(e) if isinstance(e, LoneSurrogate) else "frame is not JSON") from None


def read_frame_bytes(fd: int, max_bytes: int) -> bytes:
    """One frame's JSON text.  The peer sends one frame and then waits for the answer, so what
    is readable belongs to this frame: one read usually brings all of it (a read per part cost a
    syscall more per call)."""
    data = os.read(fd, 65536)
    if not data:
        raise FrameError("pipe closed")
    if len(data) < _HEADER.size:
        data += read_exact(fd, _HEADER.size - len(data))
    (size,) = _HEADER.unpack_from(data)
    if size > max_bytes:
        raise FrameError(f"frame of {size} bytes is over the {max_bytes} byte limit")
    body = data[_HEADER.size:]
    if len(body) < size:
        body += read_exact(fd, size - len(body))
    elif len(body) > size:
        raise FrameError("bytes past the end of the frame")
    return body
