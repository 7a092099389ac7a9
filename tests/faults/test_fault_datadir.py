"""Start-up and CLI failures of the data dir are one clear line, never a traceback: a corrupt
journal line of any shape, a read-only file system, a directory of another user, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ADMIN
from .faultlib import NOBODY, fill, needs_root, one_line_failure, run_cli, serve_once

pytestmark = pytest.mark.slow


def make_store(data: Path) -> None:
    """A data dir with a client, the keys and an SSA (three CLI commands' worth of lines)."""
    assert run_cli(data, "clients", "create", "--scope", ADMIN).returncode == 0
    assert run_cli(data, "ssa", "create", "--org-id", "o").returncode == 0


SHAPES = [b"[1,2]", b'"x"', b"7", b"null", b"true", b"garbage", b"\xff\xfe{", b"{}", b'{"t":"ssa"}',
          b'{"t":"nope","id":"x","doc":{}}', b'{"t":"ssa","id":"x","doc":[1]}',
          b'{"t":"clients","id":5,"doc":{}}',
          b'{"t":"clients","id":"x","doc":"y"}', b'{"t":"clients","id":"x","doc":{},"j":1}',
          b"[" * 5000 + b"]" * 5000]


@pytest.fixture(scope="module")
def a_store(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("store") / "data"
    make_store(data)
    return data


def with_bad_line(a_store: Path, target: Path, bad: bytes) -> Path:
    data = target / "data"
    shutil.copytree(a_store, data)
    lines = (data / "store.jsonl").read_bytes().splitlines(keepends=True)
    (data / "store.jsonl").write_bytes(lines[0] + bad + b"\n" + b"".join(lines[1:]))
    return data


@pytest.mark.parametrize("bad", SHAPES[:3] + SHAPES[10:12])
def test_a_corrupt_line_is_one_line_naming_it_for_serve_and_the_cli(a_store, tmp_path, bad):
    data = with_bad_line(a_store, tmp_path, bad)
    line = one_line_failure(serve_once(data))
    assert "line 2 is corrupt" in line, line
    assert one_line_failure(run_cli(data, "clients", "list")) == line


@pytest.mark.parametrize("bad", SHAPES)
def test_a_corrupt_line_of_any_shape_is_a_clear_error(a_store, tmp_path, bad):
    import asyncio

    from ssa_server.store import StoreUnavailable
    from ssa_server.store.tiny import TinyStore

    data = with_bad_line(a_store, tmp_path, bad)
    for exclusive in (True, False):
        with pytest.raises(StoreUnavailable, match="line 2 is corrupt"):
            asyncio.run(TinyStore(data, exclusive=exclusive).open())


def test_a_read_only_data_dir_is_one_line(tmpfs):
    mount = tmpfs("4m")
    data = mount / "data"
    make_store(data)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    line = one_line_failure(serve_once(data))
    assert "Read-only file system" in line and str(data) in line, line
    for args in (("clients", "list"), ("clients", "create", "--scope", ADMIN), ("store", "export")):
        assert "Read-only file system" in one_line_failure(run_cli(data, *args))


def test_a_data_dir_of_another_user_is_one_line(tmp_path):
    needs_root("running a process as another user (setpriv)")
    base = Path(tempfile.mkdtemp(prefix="ssa-perm-"))
    try:
        os.chmod(base, 0o755)
        data = base / "data"
        make_store(data)  # root's, 0700
        line = one_line_failure(serve_once(data, prefix=NOBODY))
        assert "Permission denied" in line and str(data) in line, line
        for args in (("clients", "list"), ("ssa", "create", "--org-id", "o")):
            assert "Permission denied" in one_line_failure(run_cli(data, *args, prefix=NOBODY))
    finally:
        shutil.rmtree(base)


def test_a_full_disk_at_first_start_is_one_line(tmpfs):
    mount = tmpfs("1m")
    data = mount / "data"
    data.mkdir()
    fill(mount)
    line = one_line_failure(serve_once(data))
    assert "No space left on device" in line, line
    line = one_line_failure(run_cli(data, "clients", "create", "--scope", ADMIN))
    assert "No space left on device" in line, line
    assert json.loads(run_cli(data, "clients", "list").stdout or "[]") == []


def test_an_export_to_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, tmpfs):
    import asyncio

    from ssa_server.store.tiny import TinyStore
    from test_store import ssa

    data = tmp_path / "data"
    make_store(data)

    async def more() -> None:
        store = TinyStore(data)
        await store.open()
        await store.add_ssas([ssa("o", description="x" * 500) for _ in range(10)])
        await store.close()

    asyncio.run(more())  # an export of ~12 KiB
    mount = tmpfs("1m")
    fill(mount, leave=4096)  # room for its first page only
    out = mount / "export.jsonl"
    line = one_line_failure(run_cli(data, "store", "export", "-o", str(out)))
    assert "No space left on device" in line and str(out) in line, line
    assert not out.exists()
