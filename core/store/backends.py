"""``open_store``: the backend ``store_url`` names, built from the settings (server, CLI, migrate)."""

from __future__ import annotations

from ..settings import Settings, SettingsError
from .base import Store

# ``store migrate`` may rewrite tables: its statements get at least this long (seconds).
MIGRATE_STATEMENT_TIMEOUT = 60.0


def open_store(settings: Settings, *, exclusive: bool, accept_journal_loss: bool = False,
               migration: bool = False) -> Store:
    """The store named by ``store_url`` (empty: the embedded TinyDB store in ``data_dir``;
    ``postgresql://...``: the shared PostgreSQL store).  ``accept_journal_loss``: the operator's
    ``serve --accept-journal-loss`` (the embedded store only; see ``docs/store.md``).
    ``migration``: the PostgreSQL store for ``store migrate`` (two connections, statements of at
    least ``MIGRATE_STATEMENT_TIMEOUT``; ``connect`` it, then ``migrate``)."""
    if settings.uses_postgres:
        try:
            from .postgres import PgStore
        except ImportError:
            raise SettingsError("SSA_STORE_URL is a PostgreSQL URL but psycopg is not installed: "
                                "pip install 'ssa-server[postgres]'") from None
        pool_min, pool_max = settings.store_pool_min, settings.store_pool_max
        timeout = settings.store_statement_timeout
        if migration:
            pool_min, pool_max, timeout = 1, 2, max(timeout, MIGRATE_STATEMENT_TIMEOUT)
        return PgStore(settings.store_url, pool_min=pool_min, pool_max=pool_max,
                       pool_timeout=settings.store_pool_timeout, statement_timeout=timeout)
    if settings.store_url and not settings.store_url.startswith("tinydb://"):
        raise SettingsError(f"SSA_STORE_URL: unsupported store {settings.store_url.split(':', 1)[0]!r}")
    from .tiny import TinyStore

    path = settings.store_url.removeprefix("tinydb://") or settings.data_dir
    return TinyStore(path, exclusive=exclusive, accept_journal_loss=accept_journal_loss)
