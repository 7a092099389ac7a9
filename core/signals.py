"""SIGTERM and SIGINT: the whole shutdown runs, then the process ends by the signal it got.

uvicorn's ``Server.serve`` stops serving on either signal and then raises it again as it returns,
so a caller's clean-up after ``serve`` never runs: ``cmd_serve``'s ``Server.stop`` (the cleaner,
the signing process, the script workers, the store) was skipped, SIGTERM killed the process at
once and its helpers outlived it.  ``GracefulServer`` keeps the signal instead; ``cmd_serve`` stops
its ``Server`` and then ends the process by that signal (``end_by``): the status a supervisor
(systemd, a container runtime, a shell) expects of a process stopped by a signal.  ``keep_signals``
also keeps a signal that comes during start-up or the stop, so neither is cut short.

With ``--workers N`` each worker is a plain uvicorn ``Server`` whose lifespan stops its own
``Server`` before uvicorn re-raises; ``Supervisor`` is uvicorn's supervisor that remembers which
signal stopped it, so the parent ends by it too once every worker is gone.
"""

from __future__ import annotations

import contextlib
import logging.handlers
import os
import signal
import socket
from collections.abc import Iterator
from multiprocessing import resource_tracker
from types import FrameType

import uvicorn
from uvicorn.server import HANDLED_SIGNALS
from uvicorn.supervisors.multiprocess import Multiprocess


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn raises what it captured again when this block ends; they are in
                # self.signals, for end_by once the caller has stopped its Server.
                self._captured_signals.clear()


@contextlib.contextmanager
def keep_signals(server: GracefulServer) -> Iterator[None]:
    """SIGTERM and SIGINT go to ``server`` for the whole block (start-up, serving, stop)."""
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Supervisor(Multiprocess):
    """uvicorn's supervisor of ``--workers N``, remembering the signal that stopped it."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.signals: list[int] = []
        super().__init__(config, sockets)

    def run(self) -> None:
        try:
            super().run()
        finally:
            # Spawning the workers started multiprocessing's resource tracker, a child that would
            # outlive this process until it sees its pipe close: stop it once the workers are gone.
            stop = getattr(resource_tracker._resource_tracker, "_stop", None)
            if stop is not None:
                stop()

    def handle_int(self) -> None:
        self.signals.append(signal.SIGINT)
        super().handle_int()

    def handle_term(self) -> None:
        self.signals.append(signal.SIGTERM)
        super().handle_term()


def end_by(signals: list[int], logs: logging.handlers.QueueListener) -> None:
    """If a signal stopped the server, end the process by it (after the log is written out);
    else return."""
    if not signals:
        return
    logs.stop()  # its thread writes the last lines; no atexit handler runs after a signal
    sig = signals[0]
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)
    os._exit(128 + sig)  # not reached unless the signal is blocked
