"""Is the journal still the one acknowledged writes went to?  Its identity and length against the
published end, and the words of every failure the journal reports: one line each, naming the
file, the cause and what to do (the public ``reason`` never names a path)."""

from __future__ import annotations

import os
from pathlib import Path

from .datadir import SEQ

ACCEPT_FLAG = "ssa-server serve --accept-journal-loss"


class JournalProblem(Exception):
    """The journal is not the file the store writes (deleted, replaced) or lost acknowledged bytes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def identity_problem(path: Path, st: os.stat_result, fd: int, published: int,
                     exclusive: bool) -> JournalProblem | None:
    """Is the journal (``st``, of ``fd``) still the file at its path (the server's only: a CLI
    process follows a compaction to the new file), and not shorter than its published end?"""
    try:
        at_path = os.stat(path).st_ino if exclusive else st.st_ino
    except FileNotFoundError:
        at_path = None
    if at_path != st.st_ino:  # (a deleted journal also has st_nlink == 0)
        here = f"/proc/{os.getpid()}/fd/{fd}"
        refused = "writes are refused (503) and /health/ready is DOWN until the path is its journal again"
        if at_path is None:
            return JournalProblem("the journal was deleted", (
                f"{path} was deleted (or moved away) while the server runs: {refused}; the journal "
                f"the server was writing is still readable at {here}: copy it back (cp {here} "
                f"{path}) and restart the server"))
        return JournalProblem("the journal was replaced by another file", (
            f"{path} was replaced by another file while the server runs: {refused}; restart the "
            f"server to use the file now there, or first copy back the journal the server was writing, "
            f"still readable at {here}"))
    if st.st_size < published:
        who = ("the server runs: writes are refused (503) and /health/ready is DOWN" if exclusive
               else "this command ran")
        return JournalProblem(
            "the journal was truncated",
            f"{path} was truncated while {who} ({st.st_size} bytes, {published} "
            "acknowledged); restore the journal from a backup")
    return None


def describe(cause: OSError | JournalProblem, path: Path, exclusive: bool,
             probe_interval: float) -> tuple[str, str]:
    """(public reason, message) of a failure to write."""
    if isinstance(cause, JournalProblem):
        return cause.reason, cause.detail
    what = cause.strerror or type(cause).__name__
    if not exclusive:  # a CLI command: its one line
        return f"the journal cannot be written ({what})", f"{path} cannot be written: {what}"
    return (f"the journal cannot be written ({what})",
            f"{path} cannot be written: {what}: writes are refused (503) and /health/ready is DOWN "
            f"until a probe write succeeds (tried at most every {probe_interval:g} s)")


def missing(path: Path, published: int) -> str:
    """A journal missing at open, though acknowledged records were written to it."""
    return (f"{path} is missing, but {published} bytes of acknowledged records were written to it "
            f"(its end is published in {SEQ}): restore it from a backup, or start `{ACCEPT_FLAG}` "
            "to begin again with an empty store")


def shorter(path: Path, missing_bytes: int, published: int) -> str:
    """A journal at open that ends before its published end."""
    return (f"{path} ends {missing_bytes} bytes before its last acknowledged end ({published} "
            f"bytes, published in {SEQ}): acknowledged records are missing; restore the journal "
            f"from a backup, or start `{ACCEPT_FLAG}` to go on without them")
