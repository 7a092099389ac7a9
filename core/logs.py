"""Logging for ``serve``: records are formatted and written by a background thread.

A log line formatted (``asctime``) and written to stderr in place costs the event loop a large
share of an ES256 create (``bench/README.md``, "Measurements behind the design").  Here the loop
only queues the record; a ``QueueListener`` thread formats and writes it.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


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
        return record


def configure_logging(level: str) -> logging.handlers.QueueListener:
    """Root logging at ``level`` through a queue; the listener is stopped (flushed) at exit."""
    # FORMAT needs neither the caller's file and line nor thread or process names: skip
    # collecting them for every record (the logging docs' "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    output = logging.StreamHandler(sys.stderr)
    output.setFormatter(logging.Formatter(FORMAT))
    listener = _Listener(records, output)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_QueueHandler(records))
    root.setLevel(level.upper())
    listener.start()
    atexit.register(listener.stop)
    return listener
