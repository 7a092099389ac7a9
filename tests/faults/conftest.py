"""Fixtures of the fault suite (helpers: ``faultlib.py``)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from test_store import make_store  # noqa: F401  (the store-contract fixture, over both stores)

from .faultlib import DiskFaults, Serve, mount_tmpfs, unmount


@pytest.fixture
def serve(tmp_path):
    """``serve(data_dir)`` -> a :class:`Serve` (not started); every one is killed after the test."""
    started: list[Serve] = []

    def make(data_dir: Path) -> Serve:
        server = Serve(data_dir, tmp_path)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def tmpfs():
    """``tmpfs(size)`` mounts a tmpfs of ``size`` (e.g. "4m") and returns its directory; it is
    unmounted and removed after the test.  Skips unless root."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        mounts.append(mount_tmpfs(size))
        return mounts[-1]

    yield mount
    for point in mounts:
        unmount(point)


@pytest.fixture
def disk_faults(monkeypatch):
    """``disk_faults(data_dir)`` -> a :class:`DiskFaults` active until the end of the test."""
    return lambda data_dir: DiskFaults(monkeypatch, data_dir)
