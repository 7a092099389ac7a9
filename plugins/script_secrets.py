"""A script's secrets: references in its ``NAME.toml``, read by the server, redacted from its text.

``[secrets] crm_key = "env:CRM_API_KEY"`` or ``"file:/run/secrets/crm"``: the file never holds
the value.  The server reads each reference when it loads the script (every reload and every
poll of the folder, so a rotated file or a changed value reloads the script); a script never
reads one itself and sees only the values, as ``context.secrets``, which travel to the sandbox
worker in the script's load frame (never in a worker's environment or arguments).

A secret file is read as the scripts folder's files are (``script_folder.read_file``): an
absolute path, a regular file only (a FIFO never blocks the server), its size checked before
it is read (``MAX_SECRET_BYTES``), symlinks followed only inside its own directory (the layout
of a Kubernetes secret volume, ``crm -> ..data/crm``).  One final newline is dropped.

Every message names the reference (``crm.toml: [secrets] crm_key: env:CRM_API_KEY is not
set``), never a value.  ``Redactor`` replaces every value in text that leaves the sandbox for
a log line or an error (the script's log lines, its failure messages, its denial) with
``[secret NAME]``.  Only whole values are found: a script that logs a secret cut, encoded or
spelled differently, or signs one into a claim, does so by its own choice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from ssa_server import secret_refs

from .sandbox.errors import ScriptRefused
from .script_folder import read_file

TABLE = "secrets"  # the NAME.toml table of references; not part of ``context.config``
MAX_SECRETS = 32
MAX_SECRET_BYTES = 64 * 1024
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def references(script: str, config: dict[str, Any]) -> dict[str, str]:
    """The ``[secrets]`` table of a script's config (``config`` keeps the rest), checked:
    names, ``env:VAR`` or ``file:/absolute/path`` references.  ScriptRefused naming the entry."""
    table = config.pop(TABLE, {})
    where = f"{script}.toml: [{TABLE}]"
    if not isinstance(table, dict):
        raise ScriptRefused(f"{where} must be a table")
    if len(table) > MAX_SECRETS:
        raise ScriptRefused(f"{where} holds more than {MAX_SECRETS} secrets")
    for name, ref in table.items():
        if not SECRET_NAME.match(name):
            raise ScriptRefused(f"{where}: a secret name is 1-64 letters, digits or '_', "
                                "not starting with a digit")
        if secret_refs.parse(ref) is None:
            raise ScriptRefused(f"{where} {name}: a reference is {secret_refs.RULE}")
    return table


def resolve(script: str, refs: Mapping[str, str], given: Mapping[str, str] | None = None,
            environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The values of ``refs``; a value in ``given`` (``scripts test --secret NAME=VALUE``) stands
    in for its reference, and names only ``given`` has are secrets too.  ScriptRefused naming the
    reference when one cannot be read."""
    values: dict[str, str] = dict(given or {})
    for name, ref in refs.items():
        if name in values:
            continue
        where = f"{script}.toml: [{TABLE}] {name}: {ref}"
        kind, _, target = ref.partition(":")
        if kind == "env":
            value = environ.get(target)
            if value is None:
                raise ScriptRefused(f"{where} is not set")
        else:
            value = _read_secret_file(where, target)
        if not value:
            raise ScriptRefused(f"{where} is empty")
        values[name] = value
    return values


def _read_secret_file(where: str, path: str) -> str:
    """The text of a secret file, under the scripts folder's rules (module doc)."""
    pure = PurePosixPath(path)
    try:
        dir_fd = os.open(pure.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ScriptRefused(f"{where}: its folder cannot be opened ({e.strerror})") from None
    try:
        raw = read_file(dir_fd, pure.name, MAX_SECRET_BYTES)
    except FileNotFoundError:
        raise ScriptRefused(f"{where}: no such file") from None
    except ScriptRefused as e:  # "NAME: why": the why, under the reference's words
        raise ScriptRefused(f"{where}: {str(e).partition(': ')[2]}") from None
    except OSError as e:
        raise ScriptRefused(f"{where}: cannot be read ({e.strerror})") from None
    finally:
        os.close(dir_fd)
    text = secret_refs.file_text(raw)
    if text is None:
        raise ScriptRefused(f"{where}: not UTF-8 text")
    return text


class Redactor:
    """Replaces a script's secret values in text bound for a log line or an error."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        # Longest first: a value that holds another is replaced whole.
        self._pairs = sorted(((v, f"[secret {k}]") for k, v in secrets.items() if v),
                             key=lambda pair: -len(pair[0]))

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def text(self, text: str) -> str:
        for value, mark in self._pairs:
            if value in text:
                text = text.replace(value, mark)
        return text

    def lines(self, lines: Any) -> Any:
        """A call's log lines (as the worker sent them) with the values replaced."""
        if not self._pairs or not isinstance(lines, list):
            return lines
        return [self.text(line) if isinstance(line, str) else line for line in lines]


NO_SECRETS = Redactor({})
