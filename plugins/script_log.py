"""What scripts log, written to the server's log at a bounded rate.

A call's lines (``context.log`` and ``print`` together) are already capped in the worker
(``script_rules.MAX_LOG_LINES`` lines of ``MAX_LOG_LINE`` characters; the rest is counted).
Here each script has a token bucket of ``lines`` lines refilled over ``interval`` seconds: a
script logging on every request of a busy server writes at most that many lines per interval.
What is dropped, in the worker or here, is counted, and one summary line per script per
interval says how many (written by the next log attempt or by ``flush``, which the folder
watcher calls on every poll).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssa_server.script_rules import MAX_LOG_LINE, MAX_LOG_LINES

from .script_secrets import NO_SECRETS, Redactor

log = logging.getLogger("ssa_server.scripts")


@dataclass
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was last refilled
    revision: str = ""
    dropped: int = 0
    since: float = 0.0  # when the first line counted in ``dropped`` was dropped


class ScriptLog:
    def __init__(self, lines: int, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.lines, self.interval = lines, interval
        self._rate = lines / interval
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # the event loop, pluggy's threads and the folder watcher

    def write(self, name: str, revision: str, lines: Any, dropped: Any = 0, *,
              redactor: Redactor = NO_SECRETS) -> None:
        """Log one call's lines of script ``name`` as far as its bucket allows; count the rest.
        ``lines`` and ``dropped`` come from the worker: checked again, never trusted.  The
        script's secret values are replaced (``redactor``) in every line written."""
        if not lines and not dropped:
            return
        lines = [str(x) for x in lines[:MAX_LOG_LINES]] if isinstance(lines, list) else []
        dropped = (dropped if type(dropped) is int and dropped > 0 else 0) + max(0, len(lines) - MAX_LOG_LINES)
        now = self._clock()
        with self._lock:
            bucket = self._bucket(name, now)
            bucket.revision = revision
            kept = min(len(lines), int(bucket.tokens))
            bucket.tokens -= kept
            self._count(bucket, dropped + len(lines) - kept, now)
            summary = self._summary(name, bucket, now)
        for line in lines[:kept]:
            log.info("script %s@%s: %s", name, revision, redactor.text(line[:MAX_LOG_LINE]) if redactor
                     else line[:MAX_LOG_LINE])
        if summary:
            log.warning("%s", summary)

    def flush(self, *, everything: bool = False) -> None:
        """Write the summaries that are due (a script that went quiet after dropping lines), or
        all pending ones (``everything``: the server stops)."""
        now = self._clock()
        with self._lock:
            summaries = [s for name, b in self._buckets.items() if (s := self._summary(name, b, now, everything))]
        for summary in summaries:
            log.warning("%s", summary)

    def _bucket(self, name: str, now: float) -> _Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(tokens=self.lines, at=now)
        else:
            bucket.tokens = min(self.lines, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
        return bucket

    @staticmethod
    def _count(bucket: _Bucket, dropped: int, now: float) -> None:
        if dropped:
            if not bucket.dropped:
                bucket.since = now
            bucket.dropped += dropped

    def _summary(self, name: str, bucket: _Bucket, now: float, due: bool = False) -> str | None:
        """The summary line when one interval has passed since the first uncounted drop."""
        if not bucket.dropped or (now - bucket.since < self.interval and not due):
            return None
        text = (f"script {name}@{bucket.revision}: {bucket.dropped} log lines dropped in the last "
                f"{now - bucket.since:.1f} s (kept: {MAX_LOG_LINES} lines of {MAX_LOG_LINE} characters per call, "
                f"{self.lines} lines per {self.interval:g} s per script)")
        bucket.dropped = 0
        return text
