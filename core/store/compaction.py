"""The compacted journal: one line per live record, then the lines appended after the snapshot,
written to a temp file and verified (length and CRC-32 read back) before the journal renames it
into place.  Where each copied line lands is kept, so a reader's offset in the old file maps to
the new one (``Tail``)."""

from __future__ import annotations

import bisect
import errno
import os
import zlib
from collections.abc import Mapping
from typing import Any

from . import entries

# A snapshot: for each table, its documents by id (what the compacted file holds first).
Snapshot = Mapping[str, Mapping[str, dict[str, Any]]]


class Unverified(Exception):
    """A compacted temp file that does not read back as it was written."""


class Tail:
    """Where the lines of the old journal past a compaction's snapshot land in the new one: a
    position of the old file (a line end the event loop had read up to) maps to the new file."""

    def __init__(self, offset: int, head: int, head_lines: int) -> None:
        self._old, self._new, self._lines = [offset], [head], [head_lines]  # at each line end

    def line(self, line: bytes, kept: bool) -> bool:
        self._old.append(self._old[-1] + len(line))
        self._new.append(self._new[-1] + (len(line) if kept else 0))
        self._lines.append(self._lines[-1] + kept)
        return kept

    def moved(self, old_offset: int) -> tuple[int, int]:
        """The new file's offset and line count for ``old_offset`` of the old file."""
        i = bisect.bisect_left(self._old, old_offset)
        if i == len(self._old) or self._old[i] != old_offset:  # not a line end: cannot happen
            raise Unverified(f"offset {old_offset} is not a line end of the copied tail")
        return self._new[i], self._lines[i]


def write_compacted(fd: int, snapshot: Snapshot, journal_fd: int, offset: int, end: int, own: bytes,
                    chunk_size: int) -> tuple[int, Tail]:
    """Write and verify the compacted file on ``fd``: the records of ``snapshot``, then the lines
    of ``journal_fd`` from ``offset`` to ``end`` except those starting with ``own`` (the
    compacting writer's, in the snapshot already).  Returns its length and where the tail went."""
    crc = length = count = 0

    def put(data: bytes) -> None:
        nonlocal crc, length
        entries.write_all(fd, data)
        crc = zlib.crc32(data, crc)
        length += len(data)

    chunk: list[bytes] = []
    for name, table in snapshot.items():
        for doc_id, doc in table.items():
            chunk.append(entries.encode({"t": name, "id": doc_id, "doc": doc})[0])  # checked when written
            if len(chunk) >= 5000:
                put(b"".join(chunk))
                count += len(chunk)
                chunk.clear()
    put(b"".join(chunk))
    count += len(chunk)
    # Lines appended after the snapshot: other processes' are copied as they are; ours are in
    # the snapshot already (written before the compaction was queued) and are dropped, or the
    # compacted file would hold each change made meanwhile twice (a purge's deletions, say).
    tail = Tail(offset, length, count)
    pos, rest = offset, b""
    while pos < end:
        data = os.pread(journal_fd, min(chunk_size, end - pos), pos)
        if not data:
            raise OSError(errno.EIO, "the journal ended while it was copied")
        pos += len(data)
        data, rest = rest + data, b""
        cut = data.rfind(b"\n") + 1
        data, rest = data[:cut], data[cut:]
        kept = [line for line in data.splitlines(keepends=True) if tail.line(line, not line.startswith(own))]
        put(b"".join(kept))
    os.fsync(fd)
    if os.fstat(fd).st_size != length:
        raise Unverified(f"the compacted file holds {os.fstat(fd).st_size} bytes, {length} were written")
    check, pos = 0, 0
    while pos < length:
        data = os.pread(fd, min(chunk_size, length - pos), pos)
        if not data:
            break
        check = zlib.crc32(data, check)
        pos += len(data)
    if check != crc:
        raise Unverified("the compacted file does not read back as it was written (CRC-32)")
    return length, tail
