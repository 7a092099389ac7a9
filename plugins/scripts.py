"""User scripts: the scripts folder in the sandbox pool, one adapter per (script, hook), hot reload.

The scripts are not a pluggy plugin: ``ScriptHost.run`` runs a hook's chain of adapters in
file-name order, on the event loop, and ``HookRunner`` (``hooks.py``) calls it before the trusted
plugins.  The chain follows ``script_rules`` (what stops it, which failures refuse); each adapter
holds the error boundary for its script.  A change in the folder rebuilds the chains and swaps
them in one assignment, so a request sees either the old set or the new one, never a half-built set.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ssa_server.errors import InvalidRequest, SandboxBusy, ScriptDenied, ScriptFailed
from ssa_server.jwt_draft import JwtDraft
from ssa_server.metrics import Metrics
from ssa_server.script_revisions import new_record
from ssa_server.script_rules import HOOKS, PASSED_ON, failure_refuses, may_refuse, stops_chain
from ssa_server.store import ScriptRevisionRecord
from ssa_server.tracing import OFF, Tracing

from .sandbox import SandboxLimits, SandboxPool, ScriptError, ScriptRefused
from .sandbox.http_broker import HttpBroker, HttpLimits
from .script_config import script_config
from .script_folder import NAME_RULE, Entry, entries, open_folder, parse_config, read_script, read_texts
from .script_log import ScriptLog
from .script_secrets import NO_SECRETS, Redactor

log = logging.getLogger("ssa_server.scripts")

_DURATIONS_KEPT = 512
# The spans of a hook's chain and of each of its scripts (tracing.py): fixed names, made once.
_CHAIN_SPAN = {hook: f"scripts.{hook}" for hook in HOOKS}
_SCRIPT_SPAN = {hook: f"script.{hook}" for hook in HOOKS}
_REVISIONS_QUEUED = 1000  # revisions seen and not yet taken by the server (the oldest go first)


@dataclass
class ScriptState:
    """What the server knows about one script file (shown by GET /scripts and the CLI)."""

    name: str
    path: str
    hooks: list[str] = field(default_factory=list)
    revision: str = ""  # content hash of the version that serves
    # loaded | error (never loaded) | stale (a newer version failed; old one serves) | failed (its
    # top level failed in a replacement worker: it does not serve until a new revision loads)
    state: str = "loading"
    last_error: str | None = None
    calls: int = 0
    failures: int = 0
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=_DURATIONS_KEPT))
    seen_hash: str = ""  # hash of the file content last tried (and a keyed digest of its secrets)
    redactor: Redactor = NO_SECRETS  # its secrets' values, kept out of its log lines and errors
    on_error: str = "fail"  # its own [sandbox] on_error, else the server's on_script_error
    settings: dict[str, Any] = field(default_factory=dict)  # its effective sandbox settings
    texts: tuple[str, str | None] | None = None  # the serving revision's NAME.py and NAME.toml (as recorded)

    def public(self) -> dict[str, Any]:
        p50 = p99 = None
        if self.durations:
            ordered = sorted(self.durations)
            p50 = round(statistics.median(ordered) * 1000, 3)
            p99 = round(ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)] * 1000, 3)
        return {"name": self.name, "file": self.path, "hooks": list(self.hooks), "revision": self.revision,
                "state": self.state, "last_error": self.last_error, "calls": self.calls,
                "failures": self.failures, "failures_by_kind": dict(self.failures_by_kind), "p50_ms": p50,
                "p99_ms": p99, "settings": dict(self.settings)}


class _Adapter:
    """Runs one hook of one script in the sandbox; the error boundary for that script.

    ``payload`` is the hook's data as the sandbox takes it (``_payload``): the next script's
    input, which ``apply`` moves on.  A method's ``False`` ends the chain (``stops_chain``).
    """

    def __init__(self, host: ScriptHost, pool: SandboxPool, state: ScriptState, hook: str) -> None:
        self.host = host
        self.pool = pool
        self.state = state
        self.hook = hook
        self._passed_on = PASSED_ON[hook]
        self.span_attributes = {"ssa.hook": hook, "ssa.script.name": state.name,
                                "ssa.script.revision": state.revision}

    def apply(self, result: dict[str, Any], payload: dict[str, Any]) -> bool | None:
        """Take the script's answer into ``payload``; False when it ends the chain."""
        for key in self._passed_on:  # in place: no dict per script
            payload[key] = result[key]
        return False if stops_chain(self.hook, result) else None

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> bool | None:
        with self.host.tracing.span(_SCRIPT_SPAN[self.hook], self.span_attributes) as span:
            started = time.perf_counter()
            try:
                result = await self.pool.call_async(self.state.name, self.hook, payload, context)
            except ScriptError as e:
                span.set_attribute("ssa.script.outcome", e.kind)
                self.failed(e, time.perf_counter() - started)
                return None
            span.set_attribute("ssa.script.outcome", outcome_word(result))
            return self.apply(self.finish(result, time.perf_counter() - started), payload)

    def failed(self, e: ScriptError, seconds: float) -> None:
        """Count and report a failure; ScriptFailed when it refuses the request (``failure_refuses``).
        A busy sandbox (admission control) is not the script's failure: 503, or where scripts
        cannot refuse (revoke) a skipped hook."""
        name = self.state.name
        if e.kind == "busy":
            self.host.metrics.script_run(name, self.hook, "busy", None)
            if not may_refuse(self.hook):
                log.warning("script %s %s skipped: %s", name, self.hook, e)
                return None
            raise SandboxBusy(retry_after=max(1, math.ceil(self.host.limits.timeout)))
        self._count(seconds)
        self.host.metrics.script_run(name, self.hook, "failed", seconds)
        self.state.failures += 1
        message = self.state.redactor.text(str(e))
        self.state.failures_by_kind[e.kind] = self.state.failures_by_kind.get(e.kind, 0) + 1
        if self.state.state != "failed":  # a failed script's listing keeps why it failed
            self.state.last_error = f"{self.hook}: {e.kind}: {message}"
        self.host.script_log.failure(name, self.state.revision, f"{self.hook} failed: {e.kind}: {message}")
        log.warning("script %s@%s %s failed: %s: %s", name, self.state.revision, self.hook, e.kind, message)
        if failure_refuses(self.hook, self.state.on_error):
            raise ScriptFailed(f"script {name}: {self.hook} failed ({e.kind})") from None
        return None

    def finish(self, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Count a success, log what the script logged, raise its denial (where scripts may refuse)."""
        name = self.state.name
        self._count(seconds)
        redactor = self.state.redactor
        self.host.script_log.write(name, self.state.revision, result.get("logs"), result.get("logs_dropped"),
                                   redactor=redactor)
        denied = result.get("denied")
        self.host.metrics.script_run(name, self.hook, "denied" if denied and may_refuse(self.hook) else "ok",
                                     seconds)
        if denied and may_refuse(self.hook):
            raise ScriptDenied(redactor.text(str(denied.get("description") or f"denied by script {name}")),
                               error=redactor.text(str(denied.get("error") or "access_denied")))
        if denied:
            log.warning("script %s tried to deny a revocation; revocations stand", name)
        return result

    def _count(self, seconds: float) -> None:
        self.state.calls += 1
        self.state.durations.append(seconds)


class _FailedAdapter(_Adapter):
    """A hook of a script that failed pool-wide, where its failure refuses the request: it
    refuses every request (fail closed, naming the script) until a new revision of the file
    loads.  It ends its chain: nothing after it would run."""

    async def run(self, payload: dict[str, Any], context: dict[str, Any]) -> bool | None:
        self.refuse()

    def refuse(self) -> NoReturn:
        self._count(0.0)
        self.host.metrics.script_run(self.state.name, self.hook, "failed", None)
        self.state.failures += 1
        self.state.failures_by_kind["not_loaded"] = self.state.failures_by_kind.get("not_loaded", 0) + 1
        raise ScriptFailed(f"script {self.state.name}: {self.hook} failed (not loaded)")


def outcome_word(result: dict[str, Any] | ScriptError) -> str:
    """A script call's outcome as its span says it: ok, denied, or the failure's kind."""
    if isinstance(result, ScriptError):
        return result.kind
    return "denied" if result.get("denied") else "ok"


def _redacted(texts: tuple[str, str | None], redactor: Redactor) -> tuple[str, str | None]:
    """A script's files as a revision keeps them: a secret's value written into them literally
    (not as a reference) is kept as ``[secret NAME]``, never as the value."""
    if not redactor:
        return texts
    source, config = texts
    return redactor.text(source), redactor.text(config) if config is not None else None


def _payload(data: Any) -> dict[str, Any]:
    """A hook's data as the sandbox takes it: a create draft's header and claims, or the list."""
    if isinstance(data, JwtDraft):
        return {"header": data.header, "claims": data.claims}
    return {"ssa_list": data}


def _take_back(data: Any, payload: dict[str, Any]) -> None:
    """The chain's result into the hook's data (the draft, or the list changed in place)."""
    if isinstance(data, JwtDraft):
        data.header, data.claims = payload["header"], payload["claims"]
    elif payload["ssa_list"] is not data:
        data[:] = payload["ssa_list"]


def limits_from(settings: Any) -> SandboxLimits:
    return SandboxLimits(timeout=settings.script_timeout, cpu=settings.script_cpu,
                         memory_mb=settings.script_memory_mb, output_kb=settings.script_output_kb)


def http_limits_from(settings: Any) -> HttpLimits:
    return HttpLimits(timeout=settings.script_http_timeout, max_bytes=settings.script_http_max_kb * 1024,
                      calls_per_step=settings.script_http_calls_per_step,
                      calls_per_second=settings.script_http_calls_per_second)


class ScriptHost:
    """Loads the scripts folder into the sandbox pool, keeps it in step, runs each hook's chain."""

    def __init__(self, scripts_dir: Path, *, limits: SandboxLimits,
                 workers: int, on_error: str = "fail", reload_interval: float = 1.0,
                 log_lines: int = 100, log_interval: float = 10.0, http: HttpLimits | None = None,
                 log_keep: int = 200, revisions_kept: int = 20, metrics: Metrics | None = None,
                 tracing: Tracing = OFF) -> None:
        self.scripts_dir = Path(scripts_dir)
        self.tracing = tracing  # a span per chain and per script (tracing.py)
        self.metrics = metrics if metrics is not None else Metrics()  # ssa_script_runs_total, durations
        self.revisions_kept = revisions_kept
        # Revisions first seen, for the server to record in its store (``take_revisions``): the
        # reload thread never waits for the store.
        self._seen: deque[ScriptRevisionRecord] = deque(maxlen=_REVISIONS_QUEUED)
        self._unloaded: deque[tuple[str, str | None]] = deque(maxlen=_REVISIONS_QUEUED)  # (name, revision)
        self.limits = limits
        self.workers = workers
        self.on_error = on_error
        self.reload_interval = reload_interval
        self.script_log = ScriptLog(log_lines, log_interval, keep=log_keep)
        self.http = HttpBroker(http or HttpLimits())  # context.http calls, counted per script
        self.pool: SandboxPool | None = None  # started with the first script
        self.scripts: dict[str, ScriptState] = {}
        self.rejected: dict[str, ScriptState] = {}  # files whose names are not script names, by escaped name
        self._folder_error = ""  # the last error reading the folder itself, logged once
        self._chains: dict[str, tuple[_Adapter, ...]] = {h: () for h in HOOKS}  # swapped whole
        self._lock = threading.Lock()  # one reload at a time (held while the pool loads)
        self._chains_lock = threading.Lock()  # chain rebuilds: never held while waiting for the pool
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._testing = threading.Lock()  # one ``test_hook`` sandbox at a time (each is a process)

    def start(self, *, watch: bool = True) -> None:
        self.reload()
        if watch:
            self._thread = threading.Thread(target=self._watch, name="ssa-scripts-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._clear_chains()
        self.script_log.flush(everything=True)
        if self.pool is not None:
            self.pool.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.reload_interval):
            self.script_log.flush()
            try:
                self.reload()
            except Exception as e:  # keep watching; the next poll retries
                log.error("script reload failed: %s: %s", type(e).__name__, e)

    def reload(self) -> bool:
        """Bring the pool and the registrations in step with the folder; True if anything changed.
        One bad file is reported and skipped: it never stops the others (``script_folder``)."""
        with self._lock:
            listed = self._list_folder()
            if listed is None:
                return False  # the folder cannot be read: not the same as an empty folder
            dir_fd, found = listed
            try:
                self._note_rejected([e for e in found if not e.allowed])
                present = {e.name for e in found if e.allowed}
                changed = self._remove([n for n in self.scripts if n not in present])
                for entry in found:
                    if entry.allowed and dir_fd is not None:
                        changed |= self._load_guarded(dir_fd, entry)
                if changed:
                    self._build_chains()
                return changed
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)

    def _list_folder(self) -> tuple[int | None, list[Entry]] | None:
        """The folder's descriptor (None: no folder) and its entries; None when the folder
        cannot be opened or listed (permissions, I/O), logged once."""
        dir_fd = None
        try:
            dir_fd = open_folder(self.scripts_dir)
            found = entries(dir_fd) if dir_fd is not None else []
        except OSError as e:
            if dir_fd is not None:
                os.close(dir_fd)
            error = f"scripts folder cannot be read ({e.strerror}): the loaded scripts keep serving"
            if error != self._folder_error:
                self._folder_error = error
                log.error("%s", error)
            return None
        self._folder_error = ""
        return dir_fd, found

    def _remove(self, names: list[str]) -> bool:
        """Scripts whose file is gone: out of the chains first (no request can reach them), then
        out of the workers."""
        gone = [self.scripts.pop(name) for name in names]
        if not gone:
            return False
        self._build_chains()
        for state in gone:
            log.info("script %s removed", state.name)
            self._unloaded.append((state.name, state.revision))
            self.script_log.forget(state.name)
            if state.revision and self.pool is not None:  # (loaded: the pool has started)
                try:
                    self.pool.unload(state.name)
                except Exception as e:  # the workers forget it when they are replaced
                    log.error("script %s: unload failed: %s", state.name, type(e).__name__)
        return True

    def _note_rejected(self, rejected: list[Entry]) -> None:
        """Files whose names are not script names: listed as errors, logged once (escaped)."""
        now = {e.name for e in rejected}
        for name in [n for n in self.rejected if n not in now]:
            del self.rejected[name]
        for entry in rejected:
            if entry.name not in self.rejected:
                path = f"{self.scripts_dir}/{entry.name}.py"
                self.rejected[entry.name] = ScriptState(entry.name, path, state="error", last_error=NAME_RULE)
                log.error("scripts folder: %s.py ignored: %s", entry.name, NAME_RULE)

    def _load_guarded(self, dir_fd: int, entry: Entry) -> bool:
        try:
            return self._load_one(dir_fd, entry)
        except Exception as e:  # e.g. MemoryError: reported like a refusal, the next file goes on
            state = self.scripts.setdefault(entry.name, ScriptState(name=entry.name, path=self._path(entry)))
            error = f"{entry.file}: cannot be loaded ({type(e).__name__})"
            if state.seen_hash != f"error:{error}":
                state.seen_hash, state.last_error = f"error:{error}", error
                state.state = "stale" if state.revision else "error"
                log.error("script %s refused: %s", entry.name, error)
            return False

    def _path(self, entry: Entry) -> str:
        return f"{self.scripts_dir}/{entry.file}"

    def _load_one(self, dir_fd: int, entry: Entry) -> bool:
        name = entry.name
        state = self.scripts.get(name)
        error: str | None
        texts: tuple[str, str | None] | None = None  # what a revision keeps, once both files are read
        seen = ""  # their content hash
        try:
            source, config_text, seen = read_texts(dir_fd, entry, self.limits.max_source_kb * 1024)
            texts = (source, config_text)
            loaded = script_config(name, parse_config(name, config_text))
            revision = seen
        except ScriptRefused as e:
            revision, source, loaded, error = "", "", script_config(name, {}), str(e)
        else:
            error = None
        marker = f"{revision}:{loaded.fingerprint()}" if revision else f"error:{error}"
        if state is not None and state.seen_hash == marker:
            return False  # nothing new since the last attempt
        if state is None:
            state = self.scripts[name] = ScriptState(name=name, path=self._path(entry))
        state.seen_hash = marker
        if error is None and self.pool is None:  # workers start with the first script, not before
            self.pool = SandboxPool(workers=self.workers, limits=self.limits, on_failed=self._script_failed,
                                    http=self.http)
        if error is None and self.pool is not None:
            try:
                hooks = self.pool.load(name, source, loaded.config, loaded.secrets, revision)
                state.hooks = [h for h in hooks if h in HOOKS]
            except ScriptRefused as e:
                error = loaded.redactor.text(str(e))
            else:
                state.revision, state.state, state.last_error = revision, "loaded", None
                state.redactor = loaded.redactor
                options = self.pool.options(name)
                state.on_error = options.on_error or self.on_error
                state.settings = options.effective(self.limits, self.on_error)
                if texts is not None:
                    state.texts = _redacted(texts, loaded.redactor)
                    self._revision_seen(name, revision, *state.texts, "loaded", None)
                log.info("script %s loaded revision=%s hooks=%s", name, revision,
                         ",".join(state.hooks) or "-")
                return True
        if texts is not None:  # (both files read: a refusal of their content, kept as a revision)
            self._revision_seen(name, seen, *_redacted(texts, loaded.redactor), "refused", error)
        state.last_error = error
        if state.state != "failed":  # a failed script stays failed until a revision loads
            state.state = "stale" if state.revision else "error"
        log.error("script %s refused (%s): %s", name,
                  "previous revision keeps serving" if state.revision else "not loaded", error)
        return False

    def _revision_seen(self, name: str, revision: str, source: str, config: str | None, state: str,
                       reason: str | None) -> None:
        self._seen.append(new_record(name, revision, source, config, state, reason, time.time()))

    def take_unloaded(self) -> list[tuple[str, str | None]]:
        """The scripts removed since the last call (name, revision), oldest first (audited)."""
        taken = []
        while self._unloaded:
            taken.append(self._unloaded.popleft())
        return taken

    def take_revisions(self) -> list[ScriptRevisionRecord]:
        """The revisions seen since the last call, oldest first (the server records them)."""
        taken = []
        while self._seen:
            taken.append(self._seen.popleft())
        return taken

    def _script_failed(self, name: str, reason: str) -> None:
        """The pool dropped ``name``: its top level failed in a replacement worker.  Called from
        the thread building that worker, maybe while a reload (holding ``_lock``) waits for it:
        takes only ``_chains_lock``."""
        state = self.scripts.get(name)
        if state is None:
            return
        state.state, state.last_error = "failed", reason
        self._build_chains()
        if state.texts is not None:
            self._revision_seen(name, state.revision, *state.texts, "failed", reason)
        refusing = [h for h in HOOKS if failure_refuses(h, state.on_error)]
        effect = (f"its {' and '.join(refusing)} hooks refuse requests"
                  if refusing else "its hooks are skipped")
        log.error("script %s@%s failed and stopped serving (%s): %s", name, state.revision, effect, reason)

    def _build_chains(self) -> None:
        with self._chains_lock:
            pool = self.pool
            if pool is None:  # no script has loaded yet
                self._clear_chains()
                return
            states = dict(self.scripts)  # a reload may add or remove entries meanwhile
            loaded = [states[n] for n in sorted(states) if states[n].revision]
            self._chains = {h: self._chain_for(h, loaded, pool) for h in HOOKS}

    def _chain_for(self, hook: str, loaded: list[ScriptState], pool: SandboxPool) -> tuple[_Adapter, ...]:
        """The adapters of ``hook`` in file-name order.  A failed script is left out where its
        failure is skipped, or ends the chain with an adapter that refuses (``failure_refuses``)."""
        chain: list[_Adapter] = []
        for state in loaded:
            if hook not in state.hooks:
                continue
            if state.state != "failed":
                chain.append(_Adapter(self, pool, state, hook))
            elif failure_refuses(hook, state.on_error):
                chain.append(_FailedAdapter(self, pool, state, hook))
                break
        return tuple(chain)

    def _clear_chains(self) -> None:
        self._chains = {h: () for h in HOOKS}

    def serves(self, hook: str) -> bool:
        """Whether any script runs on ``hook`` now (a dict lookup: asked on every request)."""
        return bool(self._chains[hook])

    async def run(self, hook: str, data: Any, context: dict[str, Any]) -> bool | None:
        """The scripts' chain of ``hook`` on ``data`` (the JwtDraft for create, the SSA list
        otherwise), on the event loop: each adapter awaits its sandbox answer without a thread
        (a thread hop costs more than the round trip).  Their changes are taken into ``data``;
        False when a script ended the chain.  A denial, a failure or a busy sandbox that refuses
        the request raises ScriptDenied, ScriptFailed or SandboxBusy (``script_rules``)."""
        chain = self._chains[hook]
        if not chain:
            return None
        payload = _payload(data)
        with self.tracing.span(_CHAIN_SPAN[hook], {"ssa.hook": hook, "ssa.scripts": len(chain)}):
            try:
                return await self._run_chains(hook, chain, payload, context)
            finally:
                _take_back(data, payload)

    async def _run_chains(self, hook: str, chain: tuple[_Adapter, ...], payload: dict[str, Any],
                          context: dict[str, Any]) -> bool | None:
        """The chain; a failed script at its end refuses after the scripts before it ran."""
        if isinstance(chain[-1], _FailedAdapter):  # the scripts before it run, then it refuses
            if await self._run_chain(hook, chain[:-1], payload, context) is False:
                return False
            chain[-1].refuse()
        return await self._run_chain(hook, chain, payload, context)

    async def _run_chain(self, hook: str, chain: tuple[_Adapter, ...], payload: dict[str, Any],
                         context: dict[str, Any]) -> bool | None:
        """One call per script for a lone script; several scripts go to one worker in one round
        trip (``SandboxPool.call_chain_async``, the worker's ``_chain``)."""
        pool = self.pool
        if len(chain) <= 1 or (pool is not None and any(pool.uses_http(a.state.name) for a in chain)):
            # (a script that may call context.http runs as a lone call: the server then knows
            # which script asks, see SandboxPool._answer_http)
            for adapter in chain:
                if await adapter.run(payload, context) is False:
                    return False
            return None
        started = time.perf_counter()
        try:
            outcomes = await chain[0].pool.call_chain_async(
                [a.state.name for a in chain], hook, payload, context,
                skip_errors=[not failure_refuses(hook, a.state.on_error) for a in chain])
        except ScriptError as e:
            if e.kind == "busy":
                if not may_refuse(hook):
                    log.warning("%s scripts %s skipped: %s", hook, ",".join(a.state.name for a in chain), e)
                    return None
                chain[0].failed(e, 0.0)  # 503
                return None
            # The worker was lost: which script lost it is learnt only from a lone call, so
            # every script runs again, one call each, in order; the one that fails names itself.
            log.warning("a script worker was lost running the %s chain (%s: %s); its scripts run again one "
                        "call each", hook, e.kind, e)
            for adapter in chain:
                if await adapter.run(payload, context) is False:
                    return False
            return None
        ended = time.perf_counter()
        share = (ended - started) / len(outcomes)
        if self.tracing.enabled:  # one round trip for the chain: each script a share of its time
            for i, (adapter, outcome) in enumerate(zip(chain, outcomes)):
                attributes = {**adapter.span_attributes, "ssa.script.batched": True,
                              "ssa.script.outcome": outcome_word(outcome)}
                self.tracing.record(_SCRIPT_SPAN[hook], attributes, started + i * share,
                                    started + (i + 1) * share)
        for adapter, outcome in zip(chain, outcomes):
            if isinstance(outcome, ScriptError):
                adapter.failed(outcome, share)
            elif adapter.apply(adapter.finish(outcome, share), payload) is False:
                return False
        return None

    def logs(self, name: str, since: int, limit: int) -> tuple[list[dict[str, Any]], int] | None:
        """``name``'s ring of log lines and failures after the cursor ``since``; None if there is
        no such script."""
        if name not in self.scripts:
            return None
        return self.script_log.read(name, since, limit)

    def listing(self) -> list[dict[str, Any]]:
        states = {**self.rejected, **self.scripts}  # a rejected name is never a script name
        return [dict(states[n].public(), http=self.http.figures(n)) for n in sorted(states)]

    def test_hook(self, name: str, hook: str, event: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """``scripts test`` for a script of the folder (POST /scripts/NAME/test, the text UI): its file
        loaded into a fresh one-worker sandbox (``ScriptRunner``, the host's limits; never the
        serving pool, so a test cannot disturb requests) and one hook run on ``event`` (default:
        the sample).  ``{"hook", "revision", "result"}``, or ``"error": {"kind", "message"}`` when
        the script failed; None when no script has that name (or its file is gone); 400
        ``invalid_request`` when it cannot load or lacks the hook.  Blocking: call it from a thread."""
        state = self.scripts.get(name)
        if state is None:
            return None
        if not self._testing.acquire(blocking=False):
            raise SandboxBusy()
        try:
            event = event or {}
            with ScriptRunner(state.path, limits=self.limits) as runner:
                out: dict[str, Any] = {"name": name, "hook": hook, "revision": runner.revision}
                try:
                    out["result"] = runner.run(hook, event.get("payload"), event.get("context"))
                except ScriptError as e:
                    out["error"] = {"kind": e.kind, "message": str(e)}
            return out
        except FileNotFoundError:
            return None
        except ScriptRefused as e:
            raise InvalidRequest(f"{name} cannot run {hook}: {e}") from None
        finally:
            self._testing.release()


def sample_event(hook: str, issuer: str = "http://127.0.0.1:8080") -> dict[str, Any]:
    """A realistic event for ``hook``: what the server would hand a script for a fresh SSA."""
    from ssa_server.ssa import ADMIN, CreateRequest, jwt_claims, list_item, record_from_request

    request = CreateRequest(org_id="acme", description="sample SSA", software_id="acme-scanner",
                            software_roles=["password"], grant_types=["client_credentials"], lifetime=86400)
    record = record_from_request(request, now=int(time.time()), expiration_in_days=30,
                                 creator_id="sample-client", issuer=issuer,
                                 jti="4f7c2b3e-0000-4000-8000-000000000001")
    context = {"client_id": "sample-client", "scopes": [ADMIN], "hook": hook,
               "settings": {"issuer": issuer, "signing_alg": "RS256", "expiration_in_days": 30,
                            "custom_attributes": []},
               "request": {"method": "POST" if hook == "create" else "GET" if hook == "get" else "DELETE",
                           "path": "/ssa", "headers": {"content-type": "application/json"}}}
    payload: dict[str, Any]
    if hook == "create":
        payload = {"header": {"typ": "jwt", "alg": "RS256", "kid": "ssa_sample_sig_rs256"},
                   "claims": jwt_claims(record)}
    else:
        payload = {"ssa_list": [list_item(record)]}
    return {"payload": payload, "context": context}


class ScriptRunner:
    """One script in its own one-worker sandbox pool: the CLI's ``scripts test`` and the pytest
    fixture ``ssa_script`` run hooks through it, on the same code path as the server."""

    def __init__(self, path: str | Path, *, limits: SandboxLimits | None = None,
                 http: HttpLimits | None = None, secrets: dict[str, str] | None = None) -> None:
        """``secrets`` stand in for the references of the script's ``[secrets]`` table (and may
        name more): ``scripts test --secret NAME=VALUE``."""
        self.path = Path(path)
        self.name = self.path.stem
        self.limits = limits or SandboxLimits()
        source, toml, self.revision = read_script(self.path, self.limits.max_source_kb * 1024)
        loaded = script_config(self.name, toml, given_secrets=secrets)
        self.redactor = loaded.redactor
        self._pool = SandboxPool(workers=1, limits=self.limits, http=HttpBroker(http or HttpLimits()))
        try:
            self.hooks = [h for h in self._pool.load(self.name, source, loaded.config, loaded.secrets,
                                                     self.revision) if h in HOOKS]
        except BaseException:
            self._pool.close()
            raise

    def run(self, hook: str, payload: dict[str, Any] | None = None,
            context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one hook on ``payload`` (default: a sample event); ScriptError on failure."""
        if hook not in HOOKS:
            raise ScriptRefused(f"unknown hook {hook!r}; use one of {', '.join(HOOKS)}")
        if hook not in self.hooks:
            raise ScriptRefused(f"{self.path.name} defines no {hook}() function")
        sample = sample_event(hook)
        try:
            result = self._pool.call(self.name, hook, payload or sample["payload"],
                                     dict(sample["context"], **(context or {})))
        except ScriptError as e:
            if not self.redactor:
                raise
            raise ScriptError(e.kind, self.redactor.text(str(e))) from None
        if self.redactor:  # what would be log lines and errors (a claim is the script's choice)
            result["logs"] = self.redactor.lines(result.get("logs", []))
            if isinstance(result.get("denied"), dict):
                result["denied"] = {k: self.redactor.text(str(v)) for k, v in result["denied"].items()}
        return result

    def create(self, claims: dict[str, Any] | None = None, header: dict[str, Any] | None = None,
               context: dict[str, Any] | None = None) -> dict[str, Any]:
        base = sample_event("create")["payload"]
        payload = {"header": dict(base["header"], **(header or {})),
                   "claims": dict(base["claims"], **(claims or {}))}
        return self.run("create", payload, context)

    def get(self, ssa_list: list[dict[str, Any]] | None = None,
            context: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.run("get", {"ssa_list": ssa_list} if ssa_list is not None else None, context)

    def revoke(self, ssa_list: list[dict[str, Any]] | None = None,
               context: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.run("revoke", {"ssa_list": ssa_list} if ssa_list is not None else None, context)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> ScriptRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_once(path: Path, hook: str, event: dict[str, Any] | None = None, *,
             limits: SandboxLimits | None = None, secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """Load ``path`` in a fresh sandbox and run one hook on ``event`` (``{"payload", "context"}``,
    either part optional: the sample fills it).  Raises ScriptRefused or ScriptError."""
    event = event or {}
    with ScriptRunner(path, limits=limits, secrets=secrets) as runner:
        return runner.run(hook, event.get("payload"), event.get("context"))
