"""The ``ssa-server`` command: serve, config, clients, keys, ssa (operators on the machine).

Every subcommand goes through the same ``Server`` and services as HTTP.  Output is JSON on
stdout; a failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ApiError
from .events import cli_actor
from .key_encryption import KeyDecryptionError
from .signers import SigningBackendError
from .logs import configure_logging
from .server import Server
from .settings import Settings, SettingsError, load_settings
from .store import StoreLocked, StoreSchemaError, StoreUnavailable, UnstorableValue
from .store.search import DEFAULT_LIMIT, MAX_LIMIT
from .store.transfer import TransferError
from .service import CallContext
from .ssa import ADMIN, REQUEST_FIELDS
from .validation import check_fields, parse_create_request

CLI_CLIENT = "cli"


def _settings(args: argparse.Namespace) -> Settings:
    cli = {name: getattr(args, name, None)
           for name in ("host", "port", "data_dir", "scripts_dir", "store_url", "workers")}
    return load_settings(cli, config_file=getattr(args, "config", None))


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


async def _with_server(settings: Settings, action: Callable[[Server], Awaitable[Any]], *,
                       keys: bool = False, hooks: bool = False) -> Any:
    """Run ``action`` on a CLI server: the shared store, opened non-exclusively (works while
    ``serve`` runs); keys only for commands that sign, scripts only for those that run hooks."""
    server = Server.build(settings, exclusive=False, actor=cli_actor())
    await server.start(background=False, scripts=hooks, keys=keys)
    try:
        return await action(server)
    finally:
        await server.stop()


# --- serve ---
NO_HTTPTOOLS = ("serve needs httptools (pip install 'uvicorn[standard]'): its HTTP edge bounds request "
                "heads, bodies and connections, uvicorn's h11 fallback cannot")


def _require_httptools() -> None:
    try:
        import httptools  # noqa: F401
    except ImportError:
        raise SettingsError(NO_HTTPTOOLS) from None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _require_httptools()
    logs = configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from .workers import serve_workers

        return serve_workers(settings, logs)
    from .app import create_app
    from .edge import edge_config
    from .metrics import listen
    from .signals import GracefulServer, end_by, keep_signals

    server = Server.build(settings, accept_journal_loss=args.accept_journal_loss)
    app = create_app(settings, server=server, manage_lifespan=False)
    config = edge_config(settings, app, lifespan="off")
    uv = GracefulServer(config)

    async def run() -> None:
        await server.start()  # opens the store (takes the data-dir lock) before accepting requests
        config.log_limits()
        stop_metrics = None
        try:
            if settings.metrics_port:
                stop_metrics = listen(settings.host, settings.metrics_port, server.metrics.registry)
            if not uv.should_exit:  # a signal during start-up: stop at once
                await uv.serve()
        finally:
            if stop_metrics is not None:
                stop_metrics()
            await server.stop()

    with keep_signals(uv), asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:  # uvloop
        runner.run(run())
    end_by(uv.signals, logs)
    return 0


# --- config ---
def cmd_config_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    shown = settings.public_dict()  # key_encryption_key is a reference (env:, file:), never the key
    shown["private_keys_at_rest"] = ("encrypted (AES-256-GCM) under key_encryption_key"
                                     if settings.key_encryption_key else
                                     "in the clear (no key_encryption_key set; docs/keys.md)")
    if settings.signing_backend == "pkcs11":  # the PIN's reference is shown, never the PIN
        shown["private_keys_at_rest"] = (f"SSA keys in PKCS#11 token {settings.pkcs11_token_label!r}, never "
                                         "out of it; the access-token key " + shown["private_keys_at_rest"])
    _print(shown)
    return 0


# --- clients ---
def _read_jwk(path: str) -> Any:
    """A JWK or JWK set file (public keys: ``ClientService.create`` refuses private members)."""
    try:  # non-blocking open: a FIFO is refused as not a regular file instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ApiError(f"--jwk {path} is not a regular file", error="invalid_client_metadata")
            text = f.read(64 * 1024 + 1)
    except OSError as e:
        raise ApiError(f"--jwk {path}: {e.strerror or type(e).__name__}", error="invalid_client_metadata") \
            from None
    try:
        if len(text) > 64 * 1024:
            raise ValueError("larger than 64 KiB")
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ApiError(f"--jwk {path} is not a JSON JWK: {e}", error="invalid_client_metadata") from None


def _client_view(record: dict[str, Any]) -> dict[str, Any]:
    """A client as the CLI shows it: never the secret's hash; its authentication method always."""
    view = {k: v for k, v in record.items() if k != "secret_hash"}
    view.setdefault("token_endpoint_auth_method", "client_secret_basic")
    return view


def cmd_clients_create(args: argparse.Namespace) -> int:
    jwks = _read_jwk(args.jwk) if args.jwk else None

    async def action(server: Server) -> Any:
        record, secret = await server.clients.create(args.scope, name=args.name or "", jwks=jwks,
                                                     jwks_uri=args.jwks_uri)
        made: dict[str, Any] = {"client_id": record["client_id"], "scopes": record["scopes"]}
        if secret is not None:  # (a secret client's answer is as it always was)
            made["client_secret"] = secret
        else:
            made["token_endpoint_auth_method"] = record.get("token_endpoint_auth_method")
        return made

    _print(asyncio.run(_with_server(_settings(args), action)))
    return 0


def cmd_clients_list(args: argparse.Namespace) -> int:
    async def action(server: Server) -> Any:
        return [_client_view(dict(c)) for c in await server.clients.list_clients()]

    _print(asyncio.run(_with_server(_settings(args), action)))
    return 0


def cmd_clients_delete(args: argparse.Namespace) -> int:
    async def action(server: Server) -> bool:
        return await server.clients.delete(args.client_id)

    if not asyncio.run(_with_server(_settings(args), action)):
        raise ApiError(f"No client with id '{args.client_id}'.", status=404, error="not_found")
    _print({"deleted": args.client_id})
    return 0


# --- keys ---
def cmd_keys_list(args: argparse.Namespace) -> int:
    async def action(server: Server) -> Any:
        return server.keys.records()

    _print(asyncio.run(_with_server(_settings(args), action)))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    async def action(server: Server) -> Any:
        new = await server.keys.rotate(args.alg, now=args.now)
        return {k: v for k, v in new.items() if k != "jwk"}

    _print(asyncio.run(_with_server(_settings(args), action, keys=True)))
    return 0


def cmd_keys_rewrap(args: argparse.Namespace) -> int:
    """Every private key re-encrypted under ``--new-key``, opened with it, ``--old-key`` (default:
    key_encryption_key) or key_encryption_key_previous.  The embedded store's journal is then
    compacted, so the data dir's lock is taken: the server must be stopped (PostgreSQL: online)."""
    from .key_encryption import KeyEncryption, read_master_key, rewrap
    from .store.backends import open_store

    settings = _settings(args)
    new = read_master_key("--new-key", args.new_key)
    old = read_master_key("--old-key", args.old_key) if args.old_key else None
    olds = [old] + [read_master_key(name, getattr(settings, name))
                    for name in ("key_encryption_key", "key_encryption_key_previous")]
    encryption = KeyEncryption(new, *olds)

    async def run() -> Any:
        store = open_store(settings, exclusive=True)
        await store.open()
        try:
            return await rewrap(store, encryption)
        finally:
            await store.close()

    done = asyncio.run(run())
    _print(dict(done, next="serve with key_encryption_key set to the new key (and "
                           "key_encryption_key_previous to the old one until every node runs so)"))
    return 0


# --- ssa ---
def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per field of ``ssa.CreateRequest``: a list's flag is repeated, a boolean has ``--no-``."""
    for f in REQUEST_FIELDS:
        if f.kind == "boolean":
            _bool_flag(parser, f.flag, f.help, f.off_help)
        elif f.kind == "texts":
            parser.add_argument(f"--{f.flag}", dest=f.name, action="append", help=f.help)
        else:
            parser.add_argument(f"--{f.flag}", dest=f.name,
                                type=int if f.kind in ("epoch", "seconds") else str, help=f.help)


def _create_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the flags gave (as a body would hold them), then the custom attributes."""
    fields: dict[str, Any] = {}
    for f in REQUEST_FIELDS:
        value = getattr(args, f.name)
        if value is not None and (value or f.kind != "texts"):
            fields[f.name] = value
    for item in args.attr or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ApiError(f"--attr expects NAME=VALUE, got {item!r}.")
        fields[key] = value
    return fields


def _cli_context(command: str) -> CallContext:
    return CallContext(CLI_CLIENT, frozenset({ADMIN}), "CLI", f"ssa {command}", actor=cli_actor())


def cmd_ssa_create(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def action(server: Server) -> Any:
        fields = await server.service.template_fields(args.template) if args.template else {}
        fields.update(_create_fields(args))
        check_fields(fields)  # flags and templates are not JSON text: the same rules as a body
        request = parse_create_request(fields, settings.custom_attributes)
        if args.save_template:
            await server.service.save_template(args.save_template, fields)
        jwt = await server.service.create(request, _cli_context("create"))
        return {"ssa": jwt}

    _print(asyncio.run(_with_server(settings, action, keys=True, hooks=True)))
    return 0


def cmd_ssa_list(args: argparse.Namespace) -> int:
    if args.where is None:
        if args.limit is not None:
            raise ApiError("--limit goes with --where.")

        async def action(server: Server) -> Any:
            return await server.service.list_ssas(_cli_context("list"), jti=args.jti, org_id=args.org_id)

        _print(asyncio.run(_with_server(_settings(args), action, keys=True, hooks=True)))
        return 0
    if args.jti is not None or args.org_id is not None:
        raise ApiError("--where searches every stored SSA: put jti=... or org_id=... in it instead of "
                       "--jti or --org-id.")

    async def search(server: Server) -> Any:
        return await server.service.search(_cli_context("list"), args.where, limit=args.limit)

    _print(asyncio.run(_with_server(_settings(args), search)))
    return 0


def cmd_ssa_verify(args: argparse.Namespace) -> int:
    """Verify an SSA as a consumer would (``verify.py``: no store, no settings): the verdict as
    JSON on stdout; exit 0 valid, 3 refused, 1 the issuer could not be asked."""
    from .verify import IssuerUnreachable, SsaVerifier, VerificationError

    verifier = SsaVerifier(args.issuer, leeway=args.leeway, check_status=not args.no_status)
    try:
        claims = verifier.verify(args.jwt.strip())
    except VerificationError as e:
        _print({"valid": False, "error": e.error, "error_description": str(e)})
        print(f"ssa-server: SSA refused: {e.error}: {e}", file=sys.stderr)
        return 1 if isinstance(e, IssuerUnreachable) else 3
    _print({"valid": True, "claims": claims})
    return 0


def cmd_ssa_revoke(args: argparse.Namespace) -> int:
    async def action(server: Server) -> Any:
        revoked = await server.service.revoke(_cli_context("revoke"), jti=args.jti, org_id=args.org_id)
        return {"revoked": [r["jti"] for r in revoked]}

    _print(asyncio.run(_with_server(_settings(args), action, keys=True, hooks=True)))
    return 0


def cmd_ssa_templates(args: argparse.Namespace) -> int:
    async def action(server: Server) -> Any:
        return await server.service.list_templates()

    _print(asyncio.run(_with_server(_settings(args), action)))
    return 0


def cmd_ssa_templates_delete(args: argparse.Namespace) -> int:
    async def action(server: Server) -> Any:
        await server.service.delete_template(args.name)
        return {"deleted": args.name}

    _print(asyncio.run(_with_server(_settings(args), action)))
    return 0


# --- audit ---
def _audit_trail(server: Server) -> Any:
    from .audit import AuditTrail

    return server.audit if server.audit is not None else AuditTrail(server.store, server.keys)


def cmd_audit_list(args: argparse.Namespace) -> int:
    from .audit import AuditQuery

    query = AuditQuery.parse(since=args.since, action=args.action, jti=args.jti, org_id=args.org_id,
                             limit=args.limit, next=args.next)

    async def action(server: Server) -> Any:
        return await _audit_trail(server).page(query)

    _print(asyncio.run(_with_server(_settings(args), action)))
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    """Every event, oldest first, one JSON object a line (to stdout or ``--output``)."""
    from . import jsonvalues

    async def action(server: Server) -> Any:
        return [jsonvalues.dumps(e, sort_keys=True) async for e in _audit_trail(server).walk()]

    lines = asyncio.run(_with_server(_settings(args), action))
    data = b"".join(line + b"\n" for line in lines)
    if args.output in (None, "-"):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        try:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            print(f"ssa-server: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            return 1
    print(f"ssa-server: exported {len(lines)} audit events", file=sys.stderr)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 (the walk's counts on stdout) or 1 with one line naming the first bad event."""
    async def action(server: Server) -> Any:
        return await _audit_trail(server).verify()

    problem, summary = asyncio.run(_with_server(_settings(args), action))
    if problem is not None:
        print(f"ssa-server: {problem.line()}", file=sys.stderr)
        return 1
    _print(dict(summary, verified=True))
    return 0


# --- tui ---
def cmd_tui(args: argparse.Namespace) -> int:
    """The text UI (``tui.py``): on a server over HTTP with ``--url``, else on the local store."""
    try:
        from .tui import SsaTui
    except ImportError:
        raise SettingsError("the text UI needs Textual: pip install 'ssa-server[tui]'") from None
    from .tui_client import HttpSource, LocalSource, Source

    source: Source
    if args.url:
        client_id = args.client_id or os.environ.get("SSA_TUI_CLIENT_ID", "")
        secret = args.client_secret or os.environ.get("SSA_TUI_CLIENT_SECRET", "")
        if not client_id or not secret:
            raise SettingsError("--url needs an admin client: --client-id/--client-secret or "
                                "SSA_TUI_CLIENT_ID/SSA_TUI_CLIENT_SECRET")
        try:
            source = HttpSource(args.url, client_id, secret)
        except ValueError as e:
            raise SettingsError(str(e)) from None
    else:
        source = LocalSource(_settings(args))
    try:
        app = SsaTui(source, page_size=args.page_size)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    app.run()
    return 0


# --- store ---
async def _with_store(settings: Settings, action: Callable[[Any], Awaitable[Any]]) -> Any:
    from .store.backends import open_store

    store = open_store(settings, exclusive=False)
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


def cmd_store_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.uses_postgres:
        _print({"store": "tinydb", "schema": "the embedded store has no schema; nothing to do"})
        return 0
    from .settings import redact_url
    from .store.backends import open_store
    from .store.postgres import PgStore

    async def run() -> tuple[int, int]:
        store = open_store(settings, exclusive=False, migration=True)
        assert isinstance(store, PgStore)
        await store.connect()
        try:
            return await store.migrate()
        finally:
            await store.close()

    before, after = asyncio.run(run())
    _print({"store": redact_url(settings.store_url), "schema_version_before": before,
            "schema_version": after})
    return 0


def cmd_store_export(args: argparse.Namespace) -> int:
    from .store.transfer import export_records, write_lines

    async def action(store: Any) -> Any:
        return list(await export_records(store, private_keys=not args.no_private_keys))

    lines = asyncio.run(_with_store(_settings(args), action))
    if args.output in (None, "-"):
        sys.stdout.flush()
        n = write_lines(lines, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        try:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold private keys
        except OSError as e:
            print(f"ssa-server: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            return 1
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as out:
                n = write_lines(lines, out)
                out.flush()
                os.fsync(out.fileno())  # "exported" means on disk
        except OSError as e:  # a full disk: no partial export is left to be taken for a whole one
            with contextlib.suppress(OSError):
                os.unlink(args.output)
            print(f"ssa-server: cannot write {args.output}: {e.strerror}", file=sys.stderr)
            return 1
    print(f"ssa-server: exported {n} records", file=sys.stderr)
    return 0


def cmd_store_import(args: argparse.Namespace) -> int:
    import time

    from .store.transfer import import_records, parse_lines

    if args.file == "-":
        import io

        tables = parse_lines(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape"))
    else:
        try:
            with open(args.file, encoding="utf-8", errors="surrogateescape") as f:
                tables = parse_lines(f)
        except OSError as e:
            print(f"ssa-server: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 1

    async def action(store: Any) -> Any:
        return await import_records(store, tables, int(time.time()))

    try:
        report = asyncio.run(_with_store(_settings(args), action))
    except ValueError as e:  # a record the target store refuses (e.g. text PostgreSQL cannot hold)
        print(f"ssa-server: import: {e}", file=sys.stderr)
        return 1
    _print(report)
    return 0


# --- scripts ---
def _script_limits(settings: Settings) -> Any:
    from ssa_server.plugins.scripts import limits_from

    return limits_from(settings)


def _check_one(path: Any, limits: Any) -> dict[str, Any]:
    from ssa_server.plugins.sandbox import ScriptRefused
    from ssa_server.plugins.scripts import ScriptRunner

    try:
        with ScriptRunner(path, limits=limits) as runner:
            return {"name": runner.name, "file": str(path), "hooks": runner.hooks,
                    "revision": runner.revision, "state": "ok", "error": None}
    except ScriptRefused as e:
        return {"name": path.stem, "file": str(path), "hooks": [], "revision": None, "state": "error",
                "error": str(e)}


def cmd_scripts_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    result = _check_one(Path(args.file), _script_limits(_settings(args)))
    if result["error"]:
        print(f"ssa-server: {result['error']}", file=sys.stderr)
        return 1
    if not result["hooks"]:
        print(f"ssa-server: {args.file} defines none of create(), get(), revoke()", file=sys.stderr)
        return 1
    _print(result)
    return 0


def cmd_scripts_list(args: argparse.Namespace) -> int:
    from ssa_server.plugins.script_folder import NAME_RULE, entries, open_folder

    settings = _settings(args)
    folder = settings.scripts_dir
    dir_fd = open_folder(folder)
    try:
        found = entries(dir_fd) if dir_fd is not None else []
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    limits = _script_limits(settings)
    _print([_check_one(folder / e.file, limits) if e.allowed else
            {"name": e.name, "file": f"{folder}/{e.name}.py", "hooks": [], "revision": None, "state": "error",
             "error": NAME_RULE} for e in found])
    return 0


def cmd_scripts_history(args: argparse.Namespace) -> int:
    from .script_revisions import RevisionError, history

    try:
        _print(asyncio.run(_with_store(_settings(args), lambda store: history(store, args.name))))
    except RevisionError as e:
        print(f"ssa-server: scripts history: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_scripts_rollback(args: argparse.Namespace) -> int:
    """Write a kept revision back into the scripts folder; the server's watcher loads it."""
    from ssa_server.plugins.sandbox import ScriptRefused
    from ssa_server.plugins.script_folder import SCRIPT_NAME, NAME_RULE, escaped, read_script, write_back

    from .script_revisions import RevisionError, rollback_target

    settings = _settings(args)
    if not SCRIPT_NAME.match(args.name):
        print(f"ssa-server: scripts rollback: {escaped(args.name)} is not a script name ({NAME_RULE})",
              file=sys.stderr)
        return 1
    try:  # the revision in the folder now (None when it cannot be read): not the default target
        current: str | None = read_script(settings.scripts_dir / f"{args.name}.py",
                                          _script_limits(settings).max_source_kb * 1024)[2]
    except ScriptRefused:
        current = None
    try:
        target = asyncio.run(_with_store(settings, lambda store: rollback_target(store, args.name,
                                                                                 args.revision, current)))
        files = write_back(settings.scripts_dir, args.name, target["source"], target["config"])
    except (RevisionError, ScriptRefused) as e:
        print(f"ssa-server: scripts rollback: {e}", file=sys.stderr)
        return 1
    _print({"name": args.name, "revision": target["revision"], "files": files})
    return 0


# --- webhooks ---
def _webhooks(args: argparse.Namespace, use: Callable[[Any], Awaitable[Any]]) -> Any:
    async def action(server: Server) -> Any:
        assert server.webhooks is not None
        return await use(server.webhooks)

    return asyncio.run(_with_server(_settings(args), action))


def cmd_webhooks_add(args: argparse.Namespace) -> int:
    secret = args.secret
    if secret is not None and secret.startswith(("env:", "file:")):  # a reference, like the other secrets
        from .secret_refs import SecretUnreadable, read

        try:
            secret = read(secret, os.environ)
        except SecretUnreadable as e:
            raise ApiError(f"--secret: {e}") from None
    events = [e for item in args.events for e in item.split(",")]
    _print(_webhooks(args, lambda w: w.add(args.url, events, secret)))
    return 0


def cmd_webhooks_list(args: argparse.Namespace) -> int:
    _print(_webhooks(args, lambda w: w.list_subscribers()))
    return 0


def cmd_webhooks_remove(args: argparse.Namespace) -> int:
    _webhooks(args, lambda w: w.remove(args.id))
    _print({"removed": args.id})
    return 0


def cmd_webhooks_deliveries(args: argparse.Namespace) -> int:
    _print(_webhooks(args, lambda w: w.deliveries(args.state, args.subscriber, args.limit)))
    return 0


def cmd_webhooks_replay(args: argparse.Namespace) -> int:
    _print({"replayed": _webhooks(args, lambda w: w.replay(args.delivery_id, dead=args.dead))})
    return 0


class _RemoteError(Exception):
    """A running server's refusal or absence, as one line (never the token)."""


def _remote_get(url: str, token: str) -> Any:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}",
                                                   "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (an http(s) URL the user gave)
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
            why = f"{body.get('error')}: {body.get('error_description')}"
        except (ValueError, AttributeError):
            why = e.reason
        raise _RemoteError(f"{e.code} {why}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _RemoteError(f"cannot reach the server ({getattr(e, 'reason', e)})") from None


def cmd_scripts_logs(args: argparse.Namespace) -> int:
    """A running server's per-script log ring over HTTP (GET /scripts/{name}/logs): the ring lives
    in the server's memory, so only the server can answer.  One JSON object per line."""
    import time
    import urllib.parse

    token = args.token or os.environ.get("SSA_ADMIN_TOKEN", "")
    if not token:
        print("ssa-server: scripts logs needs an admin access token (--token or SSA_ADMIN_TOKEN)",
              file=sys.stderr)
        return 1
    base = (args.url or _settings(args).issuer).rstrip("/")
    cursors: dict[str, int] = {}
    try:
        while True:
            names = [args.name] if args.name else [s["name"] for s in _remote_get(f"{base}/scripts", token)]
            entries = []
            for name in names:
                quoted = urllib.parse.quote(name, safe="")
                page = _remote_get(f"{base}/scripts/{quoted}/logs?since={cursors.get(name, 0)}", token)
                cursors[name] = int(page["next"])
                entries += [dict(e, script=name) for e in page["lines"]]
            for entry in sorted(entries, key=lambda e: e["seq"]):
                print(json.dumps(entry, sort_keys=True), flush=True)
            if not args.follow:
                return 0
            time.sleep(args.interval)
    except _RemoteError as e:
        print(f"ssa-server: scripts logs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def cmd_scripts_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssa_server.plugins.sandbox import ScriptError, ScriptRefused
    from ssa_server.plugins.scripts import run_once

    event = None
    if args.event:
        try:
            event = json.loads(Path(args.event).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            print(f"ssa-server: cannot read event file {args.event}: {e}", file=sys.stderr)
            return 2
        if not isinstance(event, dict):
            print(f"ssa-server: event file {args.event} must hold a JSON object", file=sys.stderr)
            return 2
    secrets = _secret_flags(args.secret or [])
    if isinstance(secrets, str):
        print(f"ssa-server: {secrets}", file=sys.stderr)
        return 2
    try:
        result = run_once(Path(args.file), args.hook, event, limits=_script_limits(_settings(args)),
                          secrets=secrets)
    except ScriptRefused as e:
        print(f"ssa-server: refused: {e}", file=sys.stderr)
        return 1
    except ScriptError as e:
        print(f"ssa-server: {args.hook} failed: {e.kind}: {e}", file=sys.stderr)
        return 1
    _print(result)
    if result.get("denied"):
        denied = result["denied"]
        print(f"ssa-server: denied: {denied.get('error')}: {denied.get('description')}", file=sys.stderr)
        return 3
    return 0


def _secret_flags(flags: list[str]) -> dict[str, str] | str:
    """``--secret NAME=VALUE`` flags as secrets, or why one is wrong (never its value)."""
    from ssa_server.plugins.script_secrets import SECRET_NAME

    secrets = {}
    for flag in flags:
        name, equals, value = flag.partition("=")
        if not equals or not SECRET_NAME.match(name):
            return ("--secret takes NAME=VALUE, NAME being 1-64 letters, digits or '_', not starting with a "
                    "digit")
        if not value:
            return f"--secret {name}= is empty"
        secrets[name] = value
    return secrets


def _bool_flag(parser: argparse.ArgumentParser, name: str, help_on: str, help_off: str) -> None:
    dest = name.replace("-", "_")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help_on)
    group.add_argument(f"--no-{name}", dest=dest, action="store_false", help=help_off)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (also SSA_CONFIG)")
    common.add_argument("--data-dir", dest="data_dir", help="data directory (SSA_DATA_DIR, default ./data)")
    common.add_argument("--store-url", dest="store_url",
                        help="postgresql://... for the shared store (SSA_STORE_URL; default: the data dir)")

    parser = argparse.ArgumentParser(prog="ssa-server", description="Software Statement Assertion server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--scripts-dir", dest="scripts_dir")
    serve.add_argument("--workers", type=int,
                       help="worker processes (SSA_WORKERS, default 1; >1 needs PostgreSQL)")
    serve.add_argument("--accept-journal-loss", dest="accept_journal_loss", action="store_true",
                       help="open a journal shorter than its last acknowledged end (docs/store.md)")
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", parents=[common], help="print the effective settings (secrets masked)")
    show.add_argument("--host")
    show.add_argument("--port", type=int)
    show.add_argument("--scripts-dir", dest="scripts_dir")
    show.set_defaults(func=cmd_config_show)

    clients = sub.add_parser("clients", help="token-endpoint clients").add_subparsers(dest="action",
                                                                                      required=True)
    c = clients.add_parser("create", parents=[common],
                           help="register a client; prints its secret once (none with --jwk or --jwks-uri)")
    c.add_argument("--scope", action="append", required=True, help="scope URI (repeatable)")
    c.add_argument("--name")
    method = c.add_mutually_exclusive_group()
    method.add_argument("--jwk", metavar="FILE",
                        help="private_key_jwt: the client's public JWK or JWK set (a JSON file)")
    method.add_argument("--jwks-uri", dest="jwks_uri", metavar="URL",
                        help="private_key_jwt: where the client publishes its keys "
                             "(https, or http to loopback)")
    c.set_defaults(func=cmd_clients_create)
    clients.add_parser("list", parents=[common]).set_defaults(func=cmd_clients_list)
    d = clients.add_parser("delete", parents=[common])
    d.add_argument("client_id")
    d.set_defaults(func=cmd_clients_delete)

    keys = sub.add_parser("keys", help="SSA signing keys").add_subparsers(dest="action", required=True)
    keys.add_parser("list", parents=[common]).set_defaults(func=cmd_keys_list)
    r = keys.add_parser("rotate", parents=[common],
                        help="add a key: published at once, signing after key_activation_delay")
    r.add_argument("--alg", help="algorithm of the new key (default: the signing key's)")
    r.add_argument("--now", action="store_true",
                   help="sign with the new key at once (emergencies: verifiers caching /jwks may fail "
                        "for a while)")
    r.set_defaults(func=cmd_keys_rotate)
    rw = keys.add_parser("rewrap", parents=[common],
                         help="re-encrypt every private key under a new master key (docs/keys.md)")
    rw.add_argument("--new-key", dest="new_key", required=True, metavar="env:VAR|file:/path",
                    help="the new master key (a reference, never the key)")
    rw.add_argument("--old-key", dest="old_key", metavar="env:VAR|file:/path",
                    help="the master key the keys are under now (default: key_encryption_key)")
    rw.set_defaults(func=cmd_keys_rewrap)

    ssa = sub.add_parser("ssa", help="SSAs, for operators on this machine").add_subparsers(dest="action",
                                                                                           required=True)
    sc = ssa.add_parser("create", parents=[common], help="create an SSA")
    _add_request_flags(sc)
    sc.add_argument("--attr", action="append", metavar="NAME=VALUE",
                    help="custom attribute (configured ones)")
    sc.add_argument("--template", help="start from a saved template")
    sc.add_argument("--save-template", dest="save_template", help="save these fields as a template")
    sc.set_defaults(func=cmd_ssa_create)
    sl = ssa.add_parser("list", parents=[common],
                        help="list active SSAs, or search every stored SSA (--where)")
    sl.add_argument("--jti")
    sl.add_argument("--org-id", dest="org_id")
    sl.add_argument("--where", action="append", metavar="FILTER",
                    help="e.g. 'status=REVOKED,created_at>=2024-01-01' (repeatable; docs/store.md, Search)")
    sl.add_argument("--limit", type=int,
                    help=f"at most this many SSAs with --where (default {DEFAULT_LIMIT}, "
                         f"at most {MAX_LIMIT})")
    sl.set_defaults(func=cmd_ssa_list)
    sr = ssa.add_parser("revoke", parents=[common], help="revoke SSAs by jti and/or org id")
    sr.add_argument("--jti")
    sr.add_argument("--org-id", dest="org_id")
    sr.set_defaults(func=cmd_ssa_revoke)
    st = ssa.add_parser("templates", parents=[common], help="list saved templates (or: list, delete NAME)")
    st.set_defaults(func=cmd_ssa_templates)
    templates = st.add_subparsers(dest="templates_action", required=False)
    templates.add_parser("list", parents=[common], help="list saved templates").set_defaults(
        func=cmd_ssa_templates)
    td = templates.add_parser("delete", parents=[common], help="delete a saved template")
    td.add_argument("name")
    td.set_defaults(func=cmd_ssa_templates_delete)
    sv = ssa.add_parser("verify",
                        help="verify an SSA as a consumer does (exit 0 valid, 3 refused, 1 unreachable)")
    sv.add_argument("jwt", help="the SSA (compact JWS)")
    sv.add_argument("--issuer", required=True, help="the issuer URL the SSA must come from")
    sv.add_argument("--leeway", type=int, default=60, help="seconds of clock skew allowed (default 60)")
    sv.add_argument("--no-status", dest="no_status", action="store_true", help="skip the status check")
    sv.set_defaults(func=cmd_ssa_verify)

    tui = sub.add_parser("tui", parents=[common],
                         help="the operator's text UI: a server over HTTP (--url) or the local store")
    tui.add_argument("--url", help="the server (e.g. https://ssa.example.org); default: the local store")
    tui.add_argument("--client-id", dest="client_id", help="an admin client (SSA_TUI_CLIENT_ID)")
    tui.add_argument("--client-secret", dest="client_secret",
                     help="its secret (SSA_TUI_CLIENT_SECRET; the variable keeps it out of the process list)")
    tui.add_argument("--page-size", dest="page_size", type=int, default=50, help="SSAs a page shows (50)")
    tui.set_defaults(func=cmd_tui)

    store = sub.add_parser("store", help="the store: schema, export, import").add_subparsers(dest="action",
                                                                                          required=True)
    store.add_parser("migrate", parents=[common], help="create or upgrade the PostgreSQL schema") \
        .set_defaults(func=cmd_store_migrate)
    ex = store.add_parser("export", parents=[common],
                          help="every record as JSON lines (private keys as stored: encrypted or clear)")
    ex.add_argument("--output", "-o", help="file to write (created 0600; default stdout)")
    ex.add_argument("--no-private-keys", dest="no_private_keys", action="store_true",
                    help="leave every key's private part out (an import of it verifies, signs with new keys)")
    ex.set_defaults(func=cmd_store_export)
    im = store.add_parser("import", parents=[common], help="add the records of an export (counts checked)")
    im.add_argument("file", help="export file, or - for stdin")
    im.set_defaults(func=cmd_store_import)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="action", required=True)
    al = audit.add_parser("list", parents=[common], help="a page of events, oldest first (as GET /audit)")
    al.add_argument("--since", help="events at or after: epoch seconds or ISO 8601")
    al.add_argument("--action", help="one action, e.g. ssa.created")
    al.add_argument("--jti")
    al.add_argument("--org-id", dest="org_id")
    al.add_argument("--limit", help="events per page, 1 to 1000 (default 100)")
    al.add_argument("--next", help="the cursor a previous page answered")
    al.set_defaults(func=cmd_audit_list)
    ae = audit.add_parser("export", parents=[common], help="every event as JSON lines")
    ae.add_argument("--output", "-o", help="a file (0600; default: stdout)")
    ae.set_defaults(func=cmd_audit_export)
    audit.add_parser("verify", parents=[common],
                     help="check the hash chain and signed checkpoints (exit 1 names the first bad one)") \
        .set_defaults(func=cmd_audit_verify)

    scripts = sub.add_parser("scripts", help="user scripts").add_subparsers(dest="action", required=True)
    ck = scripts.add_parser("check", parents=[common], help="compile and validate one script")
    ck.add_argument("file")
    ck.set_defaults(func=cmd_scripts_check)
    ls = scripts.add_parser("list", parents=[common], help="every script in the scripts folder and its state")
    ls.add_argument("--scripts-dir", dest="scripts_dir")
    ls.set_defaults(func=cmd_scripts_list)
    ts = scripts.add_parser("test", parents=[common], help="run one hook of a script in the real sandbox")
    ts.add_argument("file")
    ts.add_argument("--hook", required=True, choices=["create", "get", "revoke"])
    ts.add_argument("--event", help='JSON file: {"payload": {...}, "context": {...}} (default: a sample)')
    ts.add_argument("--secret", action="append", metavar="NAME=VALUE",
                    help="a secret for context.secrets, instead of its [secrets] reference (repeatable)")
    ts.set_defaults(func=cmd_scripts_test)
    lg = scripts.add_parser("logs", parents=[common],
                            help="a running server's log lines and failures per script")
    lg.add_argument("name", nargs="?", help="one script (default: every script)")
    lg.add_argument("--url", help="the server (default: the configured issuer)")
    lg.add_argument("--token", help="an admin access token (default: SSA_ADMIN_TOKEN)")
    lg.add_argument("--follow", action="store_true", help="keep polling for new lines")
    lg.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    lg.set_defaults(func=cmd_scripts_logs)
    hs = scripts.add_parser("history", parents=[common],
                            help="a script's kept revisions, newest first (hash, time, state, reason)")
    hs.add_argument("name")
    hs.set_defaults(func=cmd_scripts_history)
    rb = scripts.add_parser("rollback", parents=[common],
                            help="write a kept revision back into the scripts folder (hot reload serves it)")
    rb.add_argument("name")
    rb.add_argument("revision", nargs="?", help="the revision (default: the previous loaded revision)")
    rb.add_argument("--scripts-dir", dest="scripts_dir")
    rb.set_defaults(func=cmd_scripts_rollback)

    webhooks = sub.add_parser("webhooks", help="signed event webhooks (README: Webhooks)") \
        .add_subparsers(dest="action", required=True)
    wa = webhooks.add_parser("add", parents=[common], help="subscribe a URL to events (prints its id)")
    wa.add_argument("url", help="https://... (http:// to a loopback address, or with webhook_allow_http)")
    wa.add_argument("--events", action="append", required=True, metavar="ACTION,...",
                    help="e.g. ssa.created,ssa.revoked,ssa.used,ssa.expired,key.rotated")
    wa.add_argument("--secret",
                    help="HMAC-SHA256 secret for the SSA-Signature header (or env:VAR, file:/path)")
    wa.set_defaults(func=cmd_webhooks_add)
    webhooks.add_parser("list", parents=[common], help="the subscribers (never a secret)") \
        .set_defaults(func=cmd_webhooks_list)
    wr = webhooks.add_parser("remove", parents=[common], help="remove a subscriber")
    wr.add_argument("id")
    wr.set_defaults(func=cmd_webhooks_remove)
    wd = webhooks.add_parser("deliveries", parents=[common], help="the outbox: deliveries, oldest first")
    wd.add_argument("--state", choices=["pending", "delivered", "dead"])
    wd.add_argument("--subscriber", help="a subscriber's id")
    wd.add_argument("--limit", type=int, default=1000)
    wd.set_defaults(func=cmd_webhooks_deliveries)
    wp = webhooks.add_parser("replay", parents=[common],
                             help="deliver again: one delivery, or every dead one")
    wp.add_argument("delivery_id", nargs="?")
    wp.add_argument("--dead", action="store_true", help="every dead delivery")
    wp.set_defaults(func=cmd_webhooks_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # The pool logs each failed connection attempt; a command reports a failure as one line.
        logging.getLogger("psycopg.pool").disabled = True
    try:
        return int(args.func(args))
    except SettingsError as e:
        print(f"ssa-server: configuration error: {e}", file=sys.stderr)
        return 2
    except (StoreLocked, StoreSchemaError, StoreUnavailable, KeyDecryptionError, SigningBackendError) as e:
        print(f"ssa-server: {e}", file=sys.stderr)
        return 1
    except TransferError as e:
        print(f"ssa-server: import: {e}", file=sys.stderr)
        return 1
    except UnstorableValue as e:
        print(f"ssa-server: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"ssa-server: {e.error}: {e.description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): end quietly, as a pipeline expects
        _silence_stdout()
        return 128 + signal.SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot raise a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
