"""The assembled server: settings, store, keys, tokens, plugins and services, built once.

The HTTP app and the CLI both build a ``Server`` and use the same services.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import pluggy

from . import script_revisions
from .audit import AuditTrail
from .events import (SCRIPT_LOADED, SCRIPT_REFUSED, SCRIPT_UNLOADED, SERVER_ACTOR, SSA_EXPIRED, Event,
                     Events)
from .client_assertions import ClientAssertions
from .clients import ClientService
from .external_tokens import ExternalTokens
from .key_encryption import KeyEncryption
from .keys import SSA_USE, KeyRing
from .metrics import FLUSH_INTERVAL, Metrics, multiprocess_dir, timed_store
from .service import SsaService
from .signers import backend_for
from .settings import Settings
from .status_issuer import BLOCK, StatusIssuer
from .store import Store, StoreDegraded, StoreUnavailable
from .store.backends import open_store
from .throttle import client_address, parse_networks
from .tokens import TokenAuthority
from .tracing import OFF, Tracing, from_settings as tracing_from_settings
from .webhook_delivery import Deliverer
from .webhooks import Webhooks
from ssa_server.plugins.hooks import HookRunner
from ssa_server.plugins.manager import build_plugin_manager
from ssa_server.plugins.scripts import ScriptHost, http_limits_from, limits_from

log = logging.getLogger("ssa_server")

STOP_TASKS_TIMEOUT = 10.0  # seconds Server.stop waits for its cancelled background tasks
METRICS_REFRESH = 5.0  # seconds between the gauges' refreshes for a metrics_port listener


@dataclass
class Server:
    settings: Settings
    store: Store
    keys: KeyRing
    tokens: TokenAuthority
    clients: ClientService
    service: SsaService
    plugins: pluggy.PluginManager
    scripts: ScriptHost | None = None
    clock: Callable[[], float] = time.time
    metrics: Metrics = field(default_factory=Metrics)
    tracing: Tracing = OFF
    events: Events = field(default_factory=Events)
    audit: AuditTrail | None = None
    webhooks: Webhooks | None = None
    deliverer: Deliverer | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _serving: bool = False

    @classmethod
    def build(cls, settings: Settings, *, store: Store | None = None, exclusive: bool = True,
              plugins: pluggy.PluginManager | None = None, clock: Callable[[], float] = time.time,
              accept_journal_loss: bool = False, tracing: Tracing | None = None,
              actor: str = SERVER_ACTOR) -> Server:
        """``tracing``: given by tests (an in-memory exporter); else from ``otel_enabled``.
        ``actor``: who the audit trail names for what is done without a caller (the server's
        own tasks; a CLI command's ``cli:<user>``)."""
        encryption = KeyEncryption.from_settings(settings)  # before the store: a bad reference is one line
        backend = backend_for(settings)  # likewise the PIN's reference; the token is opened by keys.load
        metrics = Metrics()
        tracing = tracing if tracing is not None else tracing_from_settings(settings)
        store = store or open_store(settings, exclusive=exclusive, accept_journal_loss=accept_journal_loss)
        if settings.metrics_enabled or tracing.enabled:
            store = timed_store(store, metrics, "postgresql" if settings.uses_postgres else "tinydb", tracing,
                                timing=settings.metrics_enabled)
        proxies = parse_networks(settings.trusted_proxies)
        events = Events(clock, address=lambda scope: client_address(scope, proxies))
        keys = KeyRing(store, settings.signing_alg, refresh_interval=settings.key_refresh_interval,
                       activation_delay=settings.key_activation_delay,
                       rotation_days=settings.key_rotation_days, clock=clock, encryption=encryption,
                       metrics=metrics, events=events, actor=actor, tracing=tracing, backend=backend)
        audit = None
        if settings.audit_enabled:  # (the webhooks' outbox is the other sink)
            audit = AuditTrail(store, keys, checkpoint_events=settings.audit_checkpoint_events,
                               checkpoint_interval=settings.audit_checkpoint_interval,
                               retention_days=settings.audit_retention_days, sync=settings.audit_sync,
                               clock=clock)
            events.add_sink(audit)
        webhooks = Webhooks(store, encryption, allow_http=settings.webhook_allow_http, clock=clock)
        events.add_sink(webhooks.outbox)  # (writes nothing while there is no subscriber)
        tokens = TokenAuthority(keys, settings.issuer, settings.token_ttl, clock=clock,
                                own_tokens=settings.token_endpoint_enabled,
                                external=ExternalTokens.from_settings(settings, clock))
        plugins = plugins or build_plugin_manager()
        scripts = None
        if settings.scripts_enabled:
            scripts = ScriptHost(settings.scripts_dir, limits=limits_from(settings),
                                 workers=settings.script_workers, on_error=settings.on_script_error,
                                 reload_interval=settings.script_reload_interval,
                                 log_lines=settings.script_log_lines,
                                 log_interval=settings.script_log_interval,
                                 http=http_limits_from(settings), log_keep=settings.script_log_buffer,
                                 revisions_kept=settings.script_revisions_kept, metrics=metrics,
                                 tracing=tracing)
        hooks = HookRunner(plugins, scripts, on_error=settings.on_script_error)
        assertions = ClientAssertions(store, settings.issuer,
                                      max_lifetime=settings.client_assertion_max_lifetime,
                                      leeway=settings.client_assertion_leeway,
                                      jwks_timeout=settings.client_jwks_timeout,
                                      jwks_refetch_interval=settings.client_jwks_refetch_interval,
                                      jwks_max_age=settings.client_jwks_max_age, clock=clock)
        clients = ClientService(store, tokens, clock=clock, assertions=assertions,
                                failures_per_client=settings.token_failures_per_client,
                                failures_per_address=settings.token_failures_per_address,
                                failure_window=settings.token_failure_window,
                                trusted_proxies=settings.trusted_proxies, metrics=metrics, events=events,
                                actor=actor)
        status_lists = StatusIssuer(settings, store, keys, clock)
        return cls(settings=settings, store=store, keys=keys, tokens=tokens, clients=clients,
                   service=SsaService(settings, store, keys, hooks, clock=clock, status_lists=status_lists,
                                      metrics=metrics, events=events, actor=actor),
                   plugins=plugins, scripts=scripts, clock=clock, metrics=metrics, tracing=tracing,
                   events=events, audit=audit, webhooks=webhooks,
                   deliverer=Deliverer(settings, webhooks, keys, clock))

    async def start(self, *, background: bool = True, scripts: bool = True, keys: bool = True) -> None:
        """Open the store, load the keys, start the script pool and, for the server
        (``background``), the folder watcher and the cleaner.  CLI commands that neither sign
        nor run hooks pass ``keys=False, scripts=False``.

        The script workers start in a thread while the store replays its journal: both take
        long with a large store, and they use different cores.
        """
        host = self.scripts if scripts else None
        self.scripts = host
        starting = None
        if host is not None:
            starting = asyncio.get_running_loop().run_in_executor(None, functools.partial(host.start,
                                                                                          watch=background))
        try:
            await self.store.open()
            try:
                if self.webhooks is not None:  # known now: an outbox without subscribers gets no event
                    await self.webhooks.outbox.subscribers()
                if keys:
                    await self.keys.load(adopt_alg=background)
                else:
                    await self.keys.refresh_if_due()
                if starting is not None:
                    await starting
            except BaseException:
                await self.store.close()
                raise
        except BaseException:
            if host is not None and starting is not None:
                with contextlib.suppress(BaseException):
                    await starting
                await anyio.to_thread.run_sync(host.stop)
                self.scripts = None
            raise
        if background:
            self._serving = True
            self.tracing.start()  # the serving process's own provider (each worker's, with --workers N)
            if not self.keys.encryption.enabled:
                log.warning("private keys are stored in the clear: set key_encryption_key (docs/keys.md)")
            if self.keys.resealed:  # their clear (or old master key's) versions leave the store's files
                try:
                    await self.store.compact_keys()
                except Exception as e:  # the keys are encrypted; only their old versions wait
                    log.warning("old versions of the key records could not be dropped yet: %s",
                                type(e).__name__)
            # What start-up loaded (the store's records above all) lives as long as the server:
            # keep it out of the cyclic GC's scans, which would otherwise walk every record.
            gc.freeze()
            for check in await self.readiness():  # e.g. a full disk: reads are served, writes wait
                if check["status"] != "UP":
                    log.warning("starting with %s DOWN: %s", check["name"],
                                check.get("reason", check.get("detail")))
            self._tasks.append(asyncio.create_task(self._cleaner(), name="ssa-cleaner"))
            if self.deliverer is not None:
                self._tasks.append(asyncio.create_task(self.deliverer.run(), name="ssa-webhooks"))
            if host is not None:
                self._tasks.append(asyncio.create_task(self._revisions(host), name="ssa-script-revisions"))
            if self.settings.metrics_port or multiprocess_dir() is not None:
                self._tasks.append(asyncio.create_task(self._metrics(), name="ssa-metrics"))
            self.keys.start_signing()  # signing threads and process; CLI commands sign inline
            self.service.status_lists.block = BLOCK  # a CLI command reserves one index at a time

    async def stop(self, *, task_timeout: float = STOP_TASKS_TIMEOUT) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task that ignores its cancellation must not hang the stop
            _, stuck = await asyncio.wait(self._tasks, timeout=task_timeout)
            for task in stuck:
                log.error("background task %s did not stop within %.0f s", task.get_name(), task_timeout)
        self._tasks.clear()
        self.service.status_lists.close()  # a block reservation under way
        self.metrics.flush()  # (with --workers N, the last figures into this run's files)
        if self.audit is not None:
            try:
                await self.audit.flush()  # the events queued: into the store before it closes
            except Exception as e:  # (logged by the trail; the store closes anyway)
                log.error("audit events not flushed at stop: %s", type(e).__name__)
        self.keys.close()  # the signing process and threads
        if self.scripts is not None:
            await anyio.to_thread.run_sync(self.scripts.stop)
        await self.store.close()
        # The spans batched so far exported (OTEL_BSP_EXPORT_TIMEOUT bounds it), in a thread: the
        # exporter's HTTP call blocks.
        await anyio.to_thread.run_sync(self.tracing.shutdown)
        if self._serving:
            self._serving = False
            log.info("server stopped (cleaner, signing process, script workers and store closed)")

    async def cleanup_once(self) -> tuple[int, int]:
        """Expire SSAs past their expiration, purge old inactive ones; the keys' timeline
        (``KeyRing.maintain``: a switch's statuses, keys past their end, scheduled rotation)."""
        noted: list[tuple[str, str]] | None = [] if self.events.wanted else None
        expired, purged = await self.store.expire_and_purge(int(self.clock()), self.settings.cleanup_grace,
                                                            noted)
        if noted:
            await self.events.emit(*(Event(SSA_EXPIRED, SERVER_ACTOR, jti=jti, org_id=org_id)
                                     for jti, org_id in noted))
        await self.store.purge_deliveries(self.clock() - self.settings.webhook_retention)
        await self.keys.maintain()
        if self.audit is not None:
            await self.audit.maintain()
        if expired or purged:
            log.info("cleanup expired=%d purged=%d", expired, purged)
        return expired, purged

    async def _cleaner(self) -> None:
        while True:
            try:
                await self.cleanup_once()
            except StoreDegraded:
                pass  # the store logged why it refuses writes; the next run retries
            except Exception as e:  # keep the cleaner alive; the next run retries
                log.error("cleanup failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.settings.cleanup_interval)

    async def _revisions(self, host: ScriptHost) -> None:
        """Record the revisions the folder watcher saw (``script_revisions``), on the event loop
        (the store is not thread-safe), every reload interval; what the store refused is retried."""
        pending: list[Any] = []
        while True:
            seen = host.take_revisions()
            unloaded = host.take_unloaded()
            if self.events.wanted and (seen or unloaded):
                await self.events.emit(*self._script_events(seen, unloaded))
            pending = (pending + seen)[-1000:]
            if pending:
                pending = await script_revisions.record(self.store, pending, host.revisions_kept)
            await asyncio.sleep(max(0.05, host.reload_interval))

    @staticmethod
    def _script_events(seen: list[Any], unloaded: list[tuple[str, str | None]]) -> list[Event]:
        out = [Event(SCRIPT_LOADED if r["state"] == "loaded" else SCRIPT_REFUSED, SERVER_ACTOR,
                     outcome="ok" if r["state"] == "loaded" else "refused",
                     reason=None if r["state"] == "loaded" else r["state"],
                     details={"script": r["name"], "revision": r["revision"],
                              **({"error": (r["reason"] or "")[:500]} if r["state"] != "loaded" else {})})
               for r in seen]
        out += [Event(SCRIPT_UNLOADED, SERVER_ACTOR, details={"script": name, "revision": revision})
                for name, revision in unloaded]
        return out

    async def observe_state(self) -> None:
        """Set the gauges of what the store and the keys hold now (before a scrape, and every
        ``METRICS_REFRESH`` seconds for a ``metrics_port`` listener, which cannot ask the store)."""
        now = self.clock()
        counts: dict[str, int] = {}
        for record in self.keys.records():
            if record["use"] == SSA_USE:
                counts[record["status"]] = counts.get(record["status"], 0) + 1
        try:
            active = self.keys.active()
        except RuntimeError:
            age = None
        else:
            age = max(0.0, now - float(active.get("activates_at") or active["created_at"]))
        self.metrics.set_state(active=await self.store.count_active_ssas(int(now)), keys=counts, key_age=age)

    async def _metrics(self) -> None:
        """Where another process or thread reads this process's figures (``serve --workers N``,
        ``metrics_port``): the tallies flushed every ``FLUSH_INTERVAL``, and for a
        ``metrics_port`` the gauges refreshed every ``METRICS_REFRESH``."""
        refreshed = 0.0
        while True:
            self.metrics.flush()
            if self.settings.metrics_port and time.monotonic() - refreshed >= METRICS_REFRESH:
                refreshed = time.monotonic()
                try:
                    await self.observe_state()
                except (StoreUnavailable, OSError):
                    pass  # the readiness check says why; the next run retries
                except Exception as e:  # keep it alive
                    log.error("metrics refresh failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(FLUSH_INTERVAL)

    @property
    def backend(self) -> str:
        return "postgresql" if self.settings.uses_postgres else "tinydb"

    async def readiness(self) -> list[dict[str, str]]:
        checks = []
        try:
            await self.store.check()
            checks.append({"name": "store", "status": "UP", "backend": self.backend})
        except (StoreUnavailable, OSError) as e:
            check = {"name": "store", "status": "DOWN", "backend": self.backend, "detail": type(e).__name__}
            if isinstance(e, StoreDegraded):  # why writes are refused (no path, no secret)
                check["reason"] = e.reason
            checks.append(check)
        try:
            self.keys.active()
            checks.append({"name": "signing_key", "status": "UP"})
        except RuntimeError:
            checks.append({"name": "signing_key", "status": "DOWN"})
        return checks
