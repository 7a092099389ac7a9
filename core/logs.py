"""Logging for ``serve``: records are formatted and written by a background thread.

A log line formatted (``asctime``) and written to stderr in place costs the event loop a large
share of an ES256 create (``bench/README.md``, "Measurements behind the design").  Here the loop
only queues the record; a ``QueueListener`` thread formats and writes it.

A record made while a request is served carries that request's id (``observe.CURRENT``), taken
when the record is queued (the listener thread has no request).  ``log_format = "text"`` adds it
as `` request_id=ID`` at the end of the line; ``"json"`` writes one JSON object per line.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from .observe import CURRENT

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# What the request log line (``observe.py``) adds to its record, written as JSON members.
REQUEST_FIELDS = ("route", "status", "duration_ms", "client_id")


class _Listener(logging.handlers.QueueListener):
    def stop(self) -> None:
        """Write out what is queued and stop; a second call does nothing (``serve`` stops it
        before ending by a signal, atexit stops it otherwise)."""
        if self._thread is not None:
            super().stop()


class _QueueHandler(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The stock prepare formats the message here; the listener's handler formats it instead.
        # Our log arguments are strings and numbers, so nothing changes them meanwhile.
        info = CURRENT.get()
        record.request_id = info.request_id if info is not None else None
        return record


class TextFormatter(logging.Formatter):
    """``FORMAT``, then `` request_id=ID`` on a request's records."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} request_id={request_id}" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601, milliseconds), level, logger, message,
    request_id (null outside a request), the request line's route, status, duration_ms and
    client_id, and an exception's type and traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for name in REQUEST_FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> logging.handlers.QueueListener:
    """Root logging at ``level`` through a queue, lines as ``log_format`` says; the listener is
    stopped (flushed) at exit."""
    # FORMAT needs neither the caller's file and line nor thread or process names: skip
    # collecting them for every record (the logging docs' "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    output = logging.StreamHandler(sys.stderr)
    output.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    listener = _Listener(records, output)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_QueueHandler(records))
    root.setLevel(level.upper())
    listener.start()
    atexit.register(listener.stop)
    return listener
