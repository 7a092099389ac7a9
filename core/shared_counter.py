"""An 8-byte unsigned counter in memory that several processes map: read and written without
a system call.  The store publishes its journal's end in one (a file, ``store.seq``); the
sandbox's workers report the chain step they run in another (a memfd)."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_U64 = struct.Struct("<Q")


class SharedCounter:
    def __init__(self, fd: int) -> None:
        """Map the first 8 bytes of ``fd`` (the caller may close ``fd`` afterwards).

        The bytes are allocated first: a store through the map into a page the file system
        cannot provide (a full disk) would kill the process with SIGBUS; here it is ENOSPC."""
        os.posix_fallocate(fd, 0, _U64.size)
        self._map = mmap.mmap(fd, _U64.size)

    @classmethod
    def in_file(cls, path: Path) -> SharedCounter:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            return cls(fd)
        finally:
            os.close(fd)

    @classmethod
    def in_memfd(cls, name: str) -> tuple[SharedCounter, int]:
        """A counter in a new memfd, and the fd (to pass to a child process, then close)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            return cls(fd), fd
        except BaseException:
            os.close(fd)
            raise

    def get(self) -> int:
        return _U64.unpack_from(self._map)[0]

    def set(self, value: int) -> None:
        _U64.pack_into(self._map, 0, value)

    def flush(self) -> None:
        """Write the page back to the file now (msync), not whenever the kernel gets to it."""
        self._map.flush()

    def close(self) -> None:
        self._map.close()
