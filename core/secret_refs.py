"""References to secrets: ``env:VARIABLE`` or ``file:/absolute/path``, never the value itself.

Script secrets (``plugins/script_secrets.py``, in a script's ``NAME.toml``) and the server's own
secret settings (``key_encryption_key``) are written this way, so that neither a TOML file nor
``config show`` ever holds a value.  ``parse`` is the one syntax check for both.

``read`` is for the server's own settings, whose paths the operator chose: an absolute path, a
regular file only (a FIFO never blocks start-up), its size checked on the open descriptor before
a bounded read, symlinks followed (a Kubernetes secret volume is ``name -> ..data/name``).  A
script's secret file is read by the scripts folder's stricter rules instead
(``script_secrets``).  One final newline is dropped.  Messages name the reference, never a value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}\Z")
MAX_BYTES = 64 * 1024
RULE = '"env:VARIABLE" or "file:/absolute/path"'


class SecretUnreadable(ValueError):
    """A reference that cannot be read; the message names it, never a value."""


def parse(ref: object) -> tuple[str, str] | None:
    """``("env", NAME)`` or ``("file", PATH)`` for a well-formed reference, else None."""
    if not isinstance(ref, str):
        return None
    kind, _, target = ref.partition(":")
    if kind == "env" and ENV_NAME.match(target):
        return kind, target
    if kind == "file" and target.startswith("/") and "\x00" not in target and len(target) <= 4096:
        return kind, target
    return None


def read(ref: str, environ: Mapping[str, str] = os.environ) -> str:
    """The value a well-formed reference names (module doc); SecretUnreadable otherwise."""
    parsed = parse(ref)
    if parsed is None:
        raise SecretUnreadable(f"the value is not a reference ({RULE})")  # never echoed: it may be the secret
    kind, target = parsed
    if kind == "env":
        value = environ.get(target)
        if value is None:
            raise SecretUnreadable(f"{ref} is not set")
    else:
        value = _read_file(ref, target)
    if not value:
        raise SecretUnreadable(f"{ref} is empty")
    return value


def _read_file(ref: str, path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise SecretUnreadable(f"{ref} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretUnreadable(f"{ref} is not a regular file")
        if st.st_size > MAX_BYTES:
            raise SecretUnreadable(f"{ref} is larger than {MAX_BYTES} bytes")
        raw = os.read(fd, MAX_BYTES + 1)
    except OSError as e:
        raise SecretUnreadable(f"{ref} cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    text = file_text(raw)
    if text is None:
        raise SecretUnreadable(f"{ref} is not UTF-8 text")
    return text


def file_text(raw: bytes) -> str | None:
    """A secret file's value: its UTF-8 text without one final newline (``echo`` adds one);
    None when it is not UTF-8.  The master key's file and the scripts' secret files alike."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
