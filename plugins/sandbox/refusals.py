"""What a refused script's error says: the line, the kind and the rule, never the source.

The errors go to the log, GET /scripts and the CLI.  RestrictedPython's syntax errors end with
``at statement: '<the line>'`` and a top-level exception carries whatever message the code gave
it, so a file that is not a script (a key file, ``/etc/passwd``) or a line holding a secret
would be echoed.  Here a syntax or policy error keeps its line number and rule, with quoted
fragments kept only when they are a name or a short token (``"__dict__"``, ``'('``); a
top-level exception becomes its kind and line, with a fixed hint for the common kinds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import TracebackType

_LINE = re.compile(r"Line (\w+): (.*)", re.S)
_STATEMENT = re.compile(r" at statement: .*\Z", re.S)
_QUOTED = re.compile(r"'([^'\n]*)'|\"([^\"\n]*)\"")
_SAFE_FRAGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}|[^\w\s'\"]{1,3}|[^\x00-\x7f]")


def compile_errors(errors: Iterable[str]) -> str:
    """RestrictedPython's compile errors, each as ``line N: rule``, joined."""
    return "; ".join(_compile_error(e) for e in errors)[:1000]


def _compile_error(error: str) -> str:
    match = _LINE.match(error)
    line, text = (match.group(1), match.group(2)) if match else ("?", error)
    text = _QUOTED.sub(_fragment, _STATEMENT.sub("", text))
    return f"line {line}: {_printable(text)[:200]}"


def _fragment(match: re.Match[str]) -> str:
    quote = "'" if match.group(1) is not None else '"'
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    return f"{quote}{inner if _SAFE_FRAGMENT.fullmatch(inner) else '...'}{quote}"


def top_level_error(error: BaseException, filename: str) -> str:
    """``line N: top level raised Kind`` (+ a hint): the exception's own message is not shown."""
    kind = type(error).__name__
    line = _line_in(error.__traceback__, filename)
    where = f"line {line}: " if line is not None else ""
    return f"{where}top level raised {kind}{_hint(error)}"


def _line_in(tb: TracebackType | None, filename: str) -> int | None:
    """The script's own line that was running: the deepest frame of its file."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _hint(error: BaseException) -> str:
    if isinstance(error, ImportError):
        return " (imports are not available to scripts)"
    if isinstance(error, (MemoryError, RecursionError)):
        return " (a limit while loading)"
    name = getattr(error, "name", None)  # NameError, AttributeError: the name, when it is one
    if isinstance(error, NameError) and isinstance(name, str) and _SAFE_FRAGMENT.fullmatch(name):
        return f" (name '{name}' is not defined)"
    if isinstance(error, AttributeError) and isinstance(name, str) and _SAFE_FRAGMENT.fullmatch(name):
        return f" (no attribute '{name}')"
    return ""


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)
