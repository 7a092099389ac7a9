"""``serve --workers N``: uvicorn's process supervisor over N workers sharing one socket.

uvicorn starts each worker as a fresh interpreter that imports ``app_factory``; the parent
passes its effective settings in one environment variable, so every worker runs with exactly
what the parent resolved (CLI > env > TOML).  Each worker builds its own ``Server``: its own
connection pool, script pool, key ring and cleaner.  Before spawning, the parent opens the store
once: it creates the schema of an empty database, reports a schema that needs ``store migrate``
or an unreachable database as one line, and creates the keys (under the store's key lock), so
workers starting together find them made.
"""

from __future__ import annotations

import asyncio
import json
import logging.handlers
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from .logs import configure_logging
from .metrics import MULTIPROC_ENV, aggregate, listen
from .server import Server
from .settings import Settings, load_settings

SETTINGS_ENV = "SSA__WORKER_SETTINGS"


def _encode(settings: Settings) -> str:
    values: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        values[f.name] = (str(value) if isinstance(value, Path)
                          else list(value) if isinstance(value, tuple) else value)
    return json.dumps(values)


async def _prepare(settings: Settings) -> None:
    server = Server.build(settings, exclusive=False)
    await server.start(background=False, scripts=False, keys=True)
    await server.stop()


def serve_workers(settings: Settings, logs: logging.handlers.QueueListener) -> int:
    from .edge import edge_config
    from .signals import Supervisor, end_by

    asyncio.run(_prepare(settings))
    os.environ[SETTINGS_ENV] = _encode(settings)  # inherited by the workers, never logged
    # This run's metrics: each worker writes its figures here (0700, removed when the run ends),
    # whichever process answers a scrape sums them (metrics.py).
    metrics_dir = tempfile.mkdtemp(prefix="ssa-metrics-") if settings.metrics_enabled else None
    if metrics_dir is not None:
        os.environ[MULTIPROC_ENV] = metrics_dir
    stop_metrics = None
    try:
        # The workers inherit the raised file-descriptor limit and get the edge's limits in the config.
        config = edge_config(settings, "ssa_server.workers:app_factory", factory=True,
                             workers=settings.workers, lifespan="on")
        config.log_limits()
        supervisor = Supervisor(config, sockets=[config.bind_socket()])
        # one listener, in the parent, over every worker's figures (metrics_port needs metrics on)
        if settings.metrics_port and metrics_dir is not None:
            stop_metrics = listen(settings.host, settings.metrics_port, aggregate(metrics_dir))
        supervisor.run()
    finally:
        if stop_metrics is not None:
            stop_metrics()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    end_by(supervisor.signals, logs)
    return 0


def app_factory() -> Starlette:
    """The app of one worker process (its lifespan starts and stops its ``Server``; uvicorn then
    ends the worker by the signal it got, so the log is written out before)."""
    from .app import create_app

    settings = load_settings(json.loads(os.environ[SETTINGS_ENV]), environ={})
    logs = configure_logging(settings.log_level, settings.log_format)
    return create_app(settings, on_stop=logs.stop)
