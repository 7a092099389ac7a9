"""The failures every store reports the same way (the app maps them to 503 or 400, the CLI to one line)."""

from __future__ import annotations


class StoreLocked(RuntimeError):
    """Another server process holds this data dir."""


class StoreUnavailable(RuntimeError):
    """The backend cannot be reached right now (maps to 503)."""


class StoreDegraded(StoreUnavailable):
    """The embedded store refuses writes until its cause is gone (a full disk, an I/O error, a
    journal deleted or replaced); reads go on.  The message names the file and the cause (for the
    CLI and the one log line the store writes when it degrades); ``reason`` is the short public
    form (``/health/ready``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnstorableValue(ValueError):
    """A value the store would not read back exactly as it was given (NaN, a key that is not a
    string, text that is not UTF-8, text PostgreSQL cannot hold); nothing was stored."""


class StoreSchemaError(RuntimeError):
    """The database schema is not the version this server needs (run ``ssa-server store migrate``)."""
