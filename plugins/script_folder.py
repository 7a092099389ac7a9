"""The scripts folder, read as untrusted input.

- Names: a script is ``NAME.py`` with ``NAME`` matching ``SCRIPT_NAME`` (letters, digits, ``_``,
  ``-``; up to 64), its settings ``NAME.toml``.  Dot-files are ignored (editors' swap files,
  Kubernetes' ``..data``).  Any other ``*.py`` name is reported under an escaped rendering
  (``escaped``): never raw, since a name may hold a newline (a forged log line) or bytes that
  are not UTF-8 (no JSON string can carry them).
- Files: opened ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`` relative to the folder's
  descriptor; only regular files (a FIFO would block the opener, a device may lie about its
  size); the size is checked on the open descriptor before reading and the read is bounded
  (never more than the cap + 1 bytes), so a sparse 1 TiB file costs nothing.
- Symlinks are followed only while they stay inside the folder, which is how Kubernetes mounts a
  ConfigMap (``NAME.py -> ..data/NAME.py``, ``..data -> ..2026_01_01_.../``).  Each link is read
  and resolved here, one path component at a time, every component opened with ``O_NOFOLLOW``
  relative to the descriptor of the one before: a link swapped between the check and the open
  cannot lead out, because the kernel never follows a link for us.  An absolute link, a ``..``
  above the folder or more than ``MAX_LINKS`` links is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sandbox.errors import ScriptRefused

SCRIPT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
NAME_RULE = ("file name not allowed (a script is NAME.py, NAME being 1-64 letters, digits, '_' or '-', "
             "starting with a letter or digit)")
MAX_CONFIG = 64 * 1024  # bytes of NAME.toml
MAX_LINKS = 16  # symlinks followed for one file (Linux allows 40 for a whole path)

_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def escaped(name: str) -> str:
    """A printable ASCII rendering of a file name (``\\n``, ``\\xff``), at most 200 characters."""
    text = repr(os.fsencode(name))[2:-1]
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(frozen=True)
class Entry:
    """A ``*.py`` file of the folder: ``name`` is the script name (or its escaped rendering when
    ``allowed`` is False); ``has_config`` when ``NAME.toml`` is listed beside it."""

    name: str
    file: str  # the file name to open (the raw one for allowed names, which are plain ASCII)
    allowed: bool
    has_config: bool
    regular: bool | None  # from the directory listing: None when it cannot say (a symlink, some filesystems)


def entries(dir_fd: int) -> list[Entry]:
    """The scripts of the folder open at ``dir_fd``, by name; dot-files and other files skipped."""
    listed: dict[str, bool | None] = {}
    with os.scandir(dir_fd) as it:
        for item in it:
            if item.name.startswith("."):
                continue
            try:
                kind = None if item.is_symlink() else item.is_file(follow_symlinks=False)
            except OSError:
                kind = None
            listed[item.name] = kind
    out = []
    for file in sorted(listed):
        if not file.endswith(".py"):
            continue
        stem = file[:-3]
        if SCRIPT_NAME.match(stem):
            out.append(Entry(stem, file, True, f"{stem}.toml" in listed, listed[file]))
        else:
            out.append(Entry(escaped(stem), file, False, False, None))
    return out


def open_folder(folder: Path) -> int | None:
    """A descriptor of the folder (the configured path may itself be a link), or None if absent."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_file(dir_fd: int, name: str, cap: int, *, regular: bool | None = None) -> bytes:
    """The content of the folder's file ``name`` (at most ``cap`` bytes), under the rules above.
    ``regular=False`` (from the listing) refuses without opening.  ScriptRefused (a message safe
    to log and show) on any problem; FileNotFoundError when ``name`` itself is gone."""
    if regular is False:
        raise ScriptRefused(f"{name}: not a regular file")
    fd = _open_inside(dir_fd, name)
    try:
        info = os.fstat(fd)
        if stat.S_IFMT(info.st_mode) != stat.S_IFREG:
            raise ScriptRefused(f"{name}: not a regular file")
        if info.st_size > cap:
            raise ScriptRefused(f"{name}: larger than {cap} bytes")
        return _read_at_most(fd, cap, name)
    finally:
        os.close(fd)


def _read_at_most(fd: int, cap: int, name: str) -> bytes:
    """Up to ``cap`` bytes; refused when there are more (a file growing after the fstat, or one
    whose size the kernel does not report)."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, cap + 1 - size)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
        if size > cap:
            raise ScriptRefused(f"{name}: larger than {cap} bytes")


def _open_inside(dir_fd: int, name: str) -> int:
    """A descriptor of ``name``, a link inside the folder followed by hand (see the module doc)."""
    held: list[int] = []  # descriptors of the directories walked into, below the folder
    pending = [name]  # components still to walk, the next one last
    links = 0
    try:
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not held:
                    raise ScriptRefused(f"{name}: a symlink that leads outside the scripts folder")
                os.close(held.pop())
                continue
            here = held[-1] if held else dir_fd
            last = not pending
            try:
                fd = os.open(part, _FILE if last else _DIR, dir_fd=here)
            except OSError as e:
                if e.errno == errno.ENOENT and links == 0:
                    raise  # the entry itself is gone: the caller decides what that means
                # A link: ELOOP (O_NOFOLLOW on the last component), ENOTDIR (O_PATH opened the
                # link itself, which is no directory).  Anything else is the file's problem.
                target = _link_target(here, part) if e.errno in (errno.ELOOP, errno.ENOTDIR) else None
                if target is None:
                    raise ScriptRefused(f"{name}: cannot be read ({e.strerror})") from None
                links += 1
                if links > MAX_LINKS:
                    raise ScriptRefused(f"{name}: more than {MAX_LINKS} symlinks") from None
                if target.startswith("/"):
                    raise ScriptRefused(f"{name}: a symlink that leads outside the scripts folder") from None
                pending.extend(reversed(target.split("/")))
                continue
            if last:
                return fd
            held.append(fd)
        raise ScriptRefused(f"{name}: a symlink to a folder, not a file")
    finally:
        for fd in held:
            os.close(fd)


def _link_target(here: int, part: str) -> str | None:
    """Where the link ``part`` points, or None when it is not a link (the open's error stands)."""
    try:
        return os.readlink(part, dir_fd=here)
    except OSError:
        return None


def revision_of(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:12]


def read_script(path: Path, max_bytes: int) -> tuple[str, dict[str, Any], str]:
    """Source, config (``NAME.toml`` beside it) and revision of one script file, under the
    folder's rules (``script_folder``); ScriptRefused on any problem.  For the CLI and the
    pytest fixture: the server reads its folder with ``read_entry``."""
    if path.suffix != ".py" or not SCRIPT_NAME.match(path.stem):
        raise ScriptRefused(f"{escaped(path.name)}: {NAME_RULE}")
    dir_fd = open_folder(path.parent)
    if dir_fd is None:
        raise ScriptRefused(f"{path.name}: cannot be read (no such folder)")
    try:
        return read_entry(dir_fd, Entry(path.stem, path.name, True, True, None), max_bytes)
    finally:
        os.close(dir_fd)


def read_entry(dir_fd: int, entry: Entry, max_bytes: int) -> tuple[str, dict[str, Any], str]:
    """``read_script`` for an entry of the folder open at ``dir_fd``."""
    source, config_text, revision = read_texts(dir_fd, entry, max_bytes)
    return source, parse_config(entry.name, config_text), revision


def read_texts(dir_fd: int, entry: Entry, max_bytes: int) -> tuple[str, str | None, str]:
    """The entry's source, its ``NAME.toml`` text (None when there is none) and the revision (the
    hash of both files' bytes); ScriptRefused when either cannot be read or is not UTF-8."""
    raw = _read(dir_fd, entry.file, max_bytes, entry.regular)
    if raw is None:
        raise ScriptRefused(f"{entry.file}: removed while it was read")
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScriptRefused(f"{entry.file}: not UTF-8 text") from None
    config_name = f"{entry.name}.toml"
    config_raw = _read(dir_fd, config_name, MAX_CONFIG, None) if entry.has_config else None
    try:
        config_text = config_raw.decode("utf-8") if config_raw is not None else None
    except UnicodeDecodeError:
        raise ScriptRefused(f"{config_name}: invalid TOML (not UTF-8 text)") from None
    return source, config_text, revision_of(raw + b"\0" + (config_raw or b""))


def parse_config(name: str, text: str | None) -> dict[str, Any]:
    """``NAME.toml``'s text parsed; ScriptRefused naming the file when it is not TOML."""
    if not text:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScriptRefused(f"{name}.toml: invalid TOML ({e})") from None


def write_back(folder: Path, name: str, source: str, config: str | None) -> list[str]:
    """Write ``NAME.py`` (and ``NAME.toml``, or remove it when ``config`` is None) into the folder
    atomically: each file through a dot-file temp in the folder (which the watcher ignores),
    fsync'ed, renamed over the target, then the folder fsync'ed.  A target that is a symlink or
    not a regular file is refused before anything is written (a Kubernetes ConfigMap is rolled
    back in Kubernetes).  The files written, in order; ScriptRefused (one line) on any problem."""
    if not SCRIPT_NAME.match(name):
        raise ScriptRefused(f"{escaped(name)}: {NAME_RULE}")
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ScriptRefused(f"cannot write the scripts folder {folder}: {e.strerror}") from None
    try:
        # The config first: a watcher that reads between the two renames sees the old source.
        files = [(f"{name}.toml", config), (f"{name}.py", source)]
        for file, _ in files:
            _check_target(dir_fd, file)
        written = []
        for file, text in files:
            if text is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(file, dir_fd=dir_fd)
            else:
                _replace(dir_fd, file, text.encode("utf-8"), folder)
                written.append(file)
        os.fsync(dir_fd)
        return sorted(written)
    except OSError as e:
        raise ScriptRefused(f"cannot write the scripts folder {folder}: {e.strerror}") from None
    finally:
        os.close(dir_fd)


def _check_target(dir_fd: int, file: str) -> None:
    try:
        info = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ScriptRefused(f"{file} is a symlink: not written (roll back where its target is made)")
    if not stat.S_ISREG(info.st_mode):
        raise ScriptRefused(f"{file} is not a regular file: not written")


def _replace(dir_fd: int, file: str, data: bytes, folder: Path) -> None:
    temp = f".{file}.{secrets.token_hex(6)}.rollback"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, file, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


def _read(dir_fd: int, name: str, cap: int, regular: bool | None) -> bytes | None:
    """The file's bytes, None when it is not there; ScriptRefused when it may not be used."""
    try:
        return read_file(dir_fd, name, cap, regular=regular)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ScriptRefused(f"{name}: cannot be read ({e.strerror})") from None
