"""The server's Prometheus metrics (``GET /metrics``), one set per ``Server``.

Label values come from small fixed sets (an HTTP method, a route template, a status code, an
alg, an outcome word, a store operation, a script's file name): never a jti, an org_id or a
client_id, so a client cannot grow the set of series.

The hot paths (every request, every store operation, every signature) do not call
prometheus_client: each of its updates takes a lock, and a histogram's walks its buckets (about
1 us each, three or four per request).  They add to a ``Tally`` instead (plain numbers, touched on
the event loop only), and ``Metrics.flush`` moves the tallies into the prometheus_client metrics in
bulk: before every exposition, every ``FLUSH_INTERVAL`` seconds where another process or thread
reads the figures (``serve --workers N``, ``metrics_port``), and when the server stops.

With ``serve --workers N`` each worker writes its figures into a private directory the parent
made for that run (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``, read by
prometheus_client when it is first imported), and whichever process answers a scrape sums every
worker's files: counters and histograms add up; the gauges, which describe the shared store and
keys, show the value the most recent worker wrote (``mostrecent``).  The parent removes the
directory when the run ends.
"""

from __future__ import annotations

import inspect
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from .settings import SettingsError
from .store import Store
from .tracing import OFF, Tracing, traced

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_INTERVAL = 1.0  # seconds: how stale a worker's figures may be in another process's scrape
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format
METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})  # else "other"
# Seconds: requests and store operations from 0.25 ms (an indexed read) to 10 s (a timeout).
_FAST = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Signatures from 25 us (ES256 raw) to 0.25 s (RS512 under load); script calls up to their timeouts.
_SIGN = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_SCRIPT = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The store operations timed: every data operation of the ``Store`` protocol (its coroutines but
# open and close), read off the protocol so that a new operation is timed too.
STORE_OPS = tuple(name for name, member in vars(Store).items()
                  if inspect.iscoroutinefunction(member) and name not in ("open", "close"))


def multiprocess_dir() -> str | None:
    """The directory of this run's per-process figures (``serve --workers N``), or None."""
    return os.environ.get(MULTIPROC_ENV) or None


class Tally:
    """One histogram child's observations since the last flush (no lock: the event loop only).

    ``counts`` and ``sums`` are emptied in place by ``flush``, so a hot path may hold them (the
    store's timing wrappers do: a method call less per store operation)."""

    __slots__ = ("child", "bounds", "counts", "sums")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = tuple(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.sums = [0.0]  # the observations' total (a list: held and added to in place)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bucket with seconds <= le
        self.sums[0] += seconds

    def flush(self) -> None:
        """Into the child in bulk.  prometheus_client has no bulk observe: this adds to the child's
        own values (``_sum``, ``_buckets``: per-bucket counts, as its ``observe`` keeps them),
        which its exposition and multiprocess files read."""
        counts = self.counts
        if not any(counts):
            return
        taken = counts[:]
        counts[:] = [0] * len(taken)
        total, self.sums[0] = self.sums[0], 0.0
        self.child._sum.inc(total)
        for i, count in enumerate(taken):
            if count:
                self.child._buckets[i].inc(count)


class Count:
    """One counter child's increments since the last flush."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0

    def flush(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self.child.inc(n)


class Metrics:
    """Every metric the server exports, in a registry of its own (no global registry: each
    ``Server``, and each test's, has its own figures)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.requests = Histogram("http_server_request_duration_seconds",
                                  "HTTP requests by method, route template and status, and their duration",
                                  ["method", "route", "status"], buckets=_FAST, registry=registry)
        self.issued = Counter("ssa_issued", "SSAs issued (signed and stored), by signing alg", ["alg"],
                              registry=registry)
        self.revoked = Counter("ssa_revoked", "SSAs revoked", registry=registry)
        self.validations = Counter("ssa_validations",
                                   "POST /ssa/validation answers: valid (200) or invalid (400)",
                                   ["outcome"], registry=registry)
        self.active = Gauge("ssa_active", "SSAs in the store that are ACTIVE and not expired",
                            multiprocess_mode="mostrecent", registry=registry)
        self.signing = Histogram("ssa_signing_duration_seconds",
                                 "Time to sign an SSA (create and GET /ssa/jwt), by alg", ["alg"],
                                 buckets=_SIGN, registry=registry)
        self.store_ops = Histogram("ssa_store_operation_duration_seconds",
                                   "Store operations by operation and backend, and their duration",
                                   ["op", "backend"], buckets=_FAST, registry=registry)
        self.script_runs = Counter("ssa_script_runs",
                                   "Script hook calls by script, hook and outcome (ok, denied, failed, busy)",
                                   ["script", "hook", "outcome"], registry=registry)
        self.script_duration = Histogram("ssa_script_duration_seconds",
                                         "Script hook calls' duration, by hook", ["hook"], buckets=_SCRIPT,
                                         registry=registry)
        self.keys = Gauge("ssa_keys", "SSA signing keys by state (next, active, retiring, retired)",
                          ["state"], multiprocess_mode="mostrecent", registry=registry)
        self.key_age = Gauge("ssa_key_age_seconds", "Seconds since the active SSA key started signing",
                             multiprocess_mode="mostrecent", registry=registry)
        self.token_requests = Counter("ssa_token_requests",
                                      "POST /token answers: issued, or the OAuth error code", ["outcome"],
                                      registry=registry)
        self._tallies: dict[Any, Any] = {}  # (metric, label values) -> Tally or Count
        self._requests: dict[tuple[str, str, int], Tally] = {}  # the hottest: a key of its own
        self._valid = self.count(self.validations, "valid")
        self._invalid = self.count(self.validations, "invalid")
        self._revoked = self.count(self.revoked)

    def tally(self, metric: Any, *values: str) -> Tally:
        """The tally of a histogram's child for these label values (made once)."""
        key = (metric, values)
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Tally(metric.labels(*values) if values else metric)
        return found

    def count(self, metric: Any, *values: str) -> Count:
        key = (metric, values)
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Count(metric.labels(*values) if values else metric)
        return found

    def flush(self) -> None:
        """Every tally into prometheus_client (on the event loop, or where the tallies are made)."""
        for found in list(self._tallies.values()):
            found.flush()

    # --- the hot paths ---
    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in METHODS:  # a client may send any token as a method
            method = "other"
        key = (method, route, status)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = self.tally(self.requests, method, route, str(status))
        found.counts[bisect_left(found.bounds, seconds)] += 1  # Tally.observe, inlined (every request)
        found.sums[0] += seconds

    def signed(self, alg: str, seconds: float) -> None:
        self.tally(self.signing, alg).observe(seconds)

    def validation(self, valid: bool) -> None:
        (self._valid if valid else self._invalid).n += 1

    def revocations(self, n: int) -> None:
        self._revoked.n += n

    def issue(self, alg: str) -> None:
        self.count(self.issued, alg).n += 1

    def token(self, outcome: str) -> None:
        self.count(self.token_requests, outcome).n += 1

    def script_run(self, script: str, hook: str, outcome: str, seconds: float | None) -> None:
        self.count(self.script_runs, script, hook, outcome).n += 1
        if seconds is not None:
            self.tally(self.script_duration, hook).observe(seconds)

    # --- state, set before a scrape ---
    def set_state(self, *, active: int, keys: dict[str, int], key_age: float | None) -> None:
        self.active.set(active)
        for state in ("next", "active", "retiring", "retired"):
            self.keys.labels(state).set(keys.get(state, 0))
        if key_age is not None:
            self.key_age.set(key_age)

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's figures, or with ``serve --workers N``
        every worker's (read from the run's directory)."""
        self.flush()
        path = multiprocess_dir()
        return generate_latest(self.registry if path is None else aggregate(path))


def aggregate(path: str) -> CollectorRegistry:
    """A registry that reads every process's figures from ``path`` at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path)
    return registry


def listen(host: str, port: int, registry: CollectorRegistry) -> Callable[[], None]:
    """The metrics on their own port (``metrics_port``), open: prometheus_client's threaded
    server, off the event loop.  Returns the function that stops it."""
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise SettingsError(f"SSA_METRICS_PORT={port}: cannot listen on {host}:{port} "
                            f"({e.strerror})") from None

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop


def _timed(method: Callable[..., Awaitable[Any]], tally: Tally) -> Callable[..., Awaitable[Any]]:
    perf_counter = time.perf_counter
    counts, sums, bounds = tally.counts, tally.sums, tally.bounds  # Tally.observe, inlined

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            seconds = perf_counter() - started
            counts[bisect_left(bounds, seconds)] += 1
            sums[0] += seconds

    return timed


class TimedStore:
    """The store with each data operation (``STORE_OPS``) timed into
    ``ssa_store_operation_duration_seconds`` (unless ``timing`` is False: ``metrics_enabled =
    false``) and, with tracing on, in a ``store.OP`` span; everything else is the store's own.
    (With neither, the server does not wrap its store at all.)"""

    def __init__(self, store: Store, metrics: Metrics, backend: str, tracing: Tracing = OFF, *,
                 timing: bool = True) -> None:
        self.inner = store
        for op in STORE_OPS:
            method = getattr(store, op, None)
            if method is not None:
                if tracing.enabled:
                    method = traced(method, tracing, f"store.{op}",
                                    {"ssa.store.op": op, "ssa.store.backend": backend})
                if timing:
                    method = _timed(method, metrics.tally(metrics.store_ops, op, backend))
                setattr(self, op, method)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def timed_store(store: Store, metrics: Metrics, backend: str, tracing: Tracing = OFF, *,
                timing: bool = True) -> Store:
    return cast(Store, TimedStore(store, metrics, backend, tracing, timing=timing))
