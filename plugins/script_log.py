"""What scripts log, written to the server's log at a bounded rate.

A call's lines (``context.log`` and ``print`` together) are already capped in the worker
(``script_rules.MAX_LOG_LINES`` lines of ``MAX_LOG_LINE`` characters; the rest is counted).
Here each script has a token bucket of ``lines`` lines refilled over ``interval`` seconds: a
script logging on every request of a busy server writes at most that many lines per interval.
What is dropped, in the worker or here, is counted, and one summary line per script per
interval says how many (written by the next log attempt or by ``flush``, which the folder
watcher calls on every poll).

What is written, and each failure of a script, also goes to that script's ring (the last
``keep`` entries; GET /scripts/{name}/logs, ``scripts logs``), numbered by one sequence per
server process (the cursor).  A script's secret values are replaced (its ``Redactor``) before
the log or the ring sees a line; failures come here already redacted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
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


MAX_PAGE = 1000  # ring entries per read


class ScriptLog:
    def __init__(self, lines: int, interval: float, *, clock: Callable[[], float] = time.monotonic,
                 keep: int = 200) -> None:
        self.lines, self.interval = lines, interval
        self._rate = lines / interval
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()  # the event loop, pluggy's threads and the folder watcher
        self.keep = keep
        self._rings: dict[str, deque[dict[str, Any]]] = {}
        self._seq = 0

    def _ring(self, name: str, revision: str, kind: str, lines: list[str]) -> None:
        """Append to ``name``'s ring (the lock held)."""
        if not self.keep:
            return
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = deque(maxlen=self.keep)
        at = time.time()
        for line in lines:
            self._seq += 1
            ring.append({"seq": self._seq, "time": round(at, 3), "revision": revision, "kind": kind,
                         "line": line})

    def failure(self, name: str, revision: str, text: str) -> None:
        """A failure of script ``name`` (the server's words, never the script's source) in its ring."""
        text = text[:MAX_LOG_LINE * 2]
        with self._lock:
            self._ring(name, revision, "failure", [text])

    def read(self, name: str, since: int = 0, limit: int = MAX_PAGE) -> tuple[list[dict[str, Any]], int]:
        """``name``'s ring entries after ``since`` (at most ``limit``) and the cursor to go on from."""
        with self._lock:
            ring = list(self._rings.get(name, ()))
            last = self._seq
        newer = [dict(e) for e in ring if e["seq"] > since][:limit]
        # (a cursor past the sequence comes from an earlier process: reset to the newest)
        return newer, newer[-1]["seq"] if newer else min(since, last)

    def forget(self, name: str) -> None:
        with self._lock:
            self._rings.pop(name, None)

    def write(self, name: str, revision: str, lines: Any, dropped: Any = 0, *,
              redactor: Redactor = NO_SECRETS) -> None:
        """Log one call's lines of script ``name`` as far as its bucket allows; count the rest.
        ``lines`` and ``dropped`` come from the worker: checked again, never trusted.  The
        script's secret values are replaced (``redactor``) in every line written."""
        if not lines and not dropped:
            return
        lines = [str(x) for x in lines[:MAX_LOG_LINES]] if isinstance(lines, list) else []
        dropped = ((dropped if type(dropped) is int and dropped > 0 else 0)
                   + max(0, len(lines) - MAX_LOG_LINES))
        now = self._clock()
        with self._lock:
            bucket = self._bucket(name, now)
            bucket.revision = revision
            kept = min(len(lines), int(bucket.tokens))
            bucket.tokens -= kept
            self._count(bucket, dropped + len(lines) - kept, now)
            summary = self._summary(name, bucket, now)
            shown = [line[:MAX_LOG_LINE] for line in lines[:kept]]
            if redactor:
                shown = [redactor.text(line) for line in shown]
            self._ring(name, revision, "log", shown)
        for line in shown:
            log.info("script %s@%s: %s", name, revision, line)
        if summary:
            log.warning("%s", summary)

    def flush(self, *, everything: bool = False) -> None:
        """Write the summaries that are due (a script that went quiet after dropping lines), or
        all pending ones (``everything``: the server stops)."""
        now = self._clock()
        with self._lock:
            summaries = [s for name, b in self._buckets.items()
                         if (s := self._summary(name, b, now, everything))]
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
                f"{now - bucket.since:.1f} s (kept: {MAX_LOG_LINES} lines of {MAX_LOG_LINE} characters "
                f"per call, {self.lines} lines per {self.interval:g} s per script)")
        bucket.dropped = 0
        return text
