"""Throwaway PostgreSQL clusters for tests and benchmarks: initdb + pg_ctl on a temporary dir.

PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` system user
(its directory is handed to that user).  It listens on 127.0.0.1 only, on the given port, with
its socket in the cluster directory, and trusts local connections (it holds test data only).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from ports import free_port  # also what bench/pg_bench.py imports from here

HOW_TO = ("PostgreSQL tests need a server: install PostgreSQL (initdb and pg_ctl on PATH or in "
          "/usr/lib/postgresql/*/bin) or set SSA_TEST_PG_URL=postgresql://USER@127.0.0.1:PORT/postgres "
          "(a role that may CREATE DATABASE); `bash .ci/run` does it all")


class ClusterError(RuntimeError):
    pass


def find_bin() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                    reverse=True):
        if os.path.exists(f"{d}/initdb") and os.path.exists(f"{d}/pg_ctl"):
            return Path(d)
    return None


class Cluster:
    def __init__(self, port: int | None = None) -> None:
        self.bin = find_bin()
        if self.bin is None:
            raise ClusterError("initdb/pg_ctl not found")
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ssa-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError("running as root and there is no 'postgres' user to run PostgreSQL "
                                   "as") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.root, 0o700)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise ClusterError(f"{Path(args[0]).name} failed: {(r.stderr or r.stdout).strip()[-500:]}")

    def init(self) -> Cluster:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        return self

    def start(self, *, durable: bool = False) -> Cluster:
        """Start it; not ``durable`` (tests): no fsync, the data is thrown away anyway."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                   "-c max_connections=200")
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except (ClusterError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(port: int | None = None, *, durable: bool = False) -> Cluster:
    cluster = Cluster(port)
    try:
        return cluster.init().start(durable=durable)
    except BaseException:
        shutil.rmtree(cluster.root, ignore_errors=True)
        raise
