"""The embedded store's data dir: its files, kept private (the dir 0700, every file 0600: the keys
table holds private keys), the server's lock, the journal's flock, the write probe."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from . import entries
from .errors import StoreLocked

JOURNAL = "store.jsonl"
TEMP = "store.jsonl.tmp"  # a compaction in progress (removed at open when one was interrupted)
LOCK = "server.lock"
SEQ = "store.seq"  # the journal's published end (a SharedCounter)
PROBE = ".write-probe"  # written, fsync'ed and removed to learn whether the disk takes writes again
_PROBE_SIZE = 16 << 10  # a few pages: the probe needs real room, more than a freed partial page


def prepare(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(os.stat(data_dir).st_mode) != 0o700:
        os.chmod(data_dir, 0o700)


def take_server_lock(data_dir: Path) -> int:
    """The descriptor holding ``server.lock`` (closing it releases the lock); StoreLocked, naming
    the holder's pid, if another server has it."""
    fd = os.open(data_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLocked(f"data dir {data_dir} is in use by another ssa-server process "
                          f"(pid {holder})") from None
    try:  # the pid is for the message above only: a full disk must not stop the start
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError:
        pass
    return fd


def open_journal(path: Path, *, create: bool = False) -> int:
    """The journal opened for appending (and reading), 0600."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
        os.fchmod(fd, 0o600)
    return fd


def write_probe(data_dir: Path) -> None:
    """Write, fsync and remove a small file: OSError unless the disk takes writes now."""
    probe = data_dir / PROBE
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        entries.write_all(fd, b"\0" * _PROBE_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()


def fsync_dir(data_dir: Path) -> None:
    """Make a rename in the data dir durable (OSError if it cannot be)."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Flock:
    """An exclusive flock on the journal (``acquire``/``release``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # compaction closed this fd; closing released the lock
