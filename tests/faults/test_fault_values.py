"""Values are canonical before they are acknowledged, on both stores: NaN and Infinity are refused
at the edge, nesting deeper than 32 levels is refused before any recursive code runs, and what the
store acknowledges reads back as it was given (HTTP, ``ssa create --attr``, templates, ``store
import``, and the store API itself)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from conftest import ADMIN, truncate
from .faultlib import clean_env, one_line_failure, run_cli
from ssa_server.store import UnstorableValue
from test_store import ssa

MAX_DEPTH = 32


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def post(api, raw: bytes, H):
    return api.client.post("/ssa", content=raw, headers=dict(H, **{"content-type": "application/json"}))


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def assert_invalid(r) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and set(r.json()) == {"error", "error_description"}


BIG = "123456789012345678901234"  # beyond 64 bits: the body is read by the stdlib (after orjson's check)


@pytest.mark.parametrize("value", [f"[NaN,{BIG}]", "NaN", "Infinity", "-Infinity", f"[-Infinity,{BIG}]",
                                   "1e400", f"[1e400,{BIG}]", '{"a":[1,{"b":NaN}]}'])
def test_nan_and_infinity_are_refused_at_the_edge(api, value):
    H = api.auth(ADMIN)
    assert_invalid(post(api, b'{"org_id":"x","myCustomAttr1":%s}' % value.encode(), H))
    assert api.call(api.server.store.count_ssas) == 0
    assert api.client.get("/ssa", params={"org_id": "x"}, headers=H).json() == []


def test_exact_values_are_kept_and_read_back(make_api, tmp_path, store_kind):
    value = [123456789012345678901234, -(2**70), 1.5, -0.0, 1e300, "żółw", {"k": [None, True]}]
    api = make_api(custom_attributes=("myCustomAttr1",), data_dir=tmp_path / "d")
    H = api.auth(ADMIN)
    r = post(api, json.dumps({"org_id": "exact", "myCustomAttr1": value}).encode(), H)
    assert r.status_code == 201, r.text
    assert api.verify(r.json()["ssa"])[1]["myCustomAttr1"] == value
    (item,) = api.client.get("/ssa", params={"org_id": "exact"}, headers=H).json()
    assert item["ssa"]["myCustomAttr1"] == value
    api.client.__exit__(None, None, None)
    again = make_api(custom_attributes=("myCustomAttr1",), data_dir=tmp_path / "d")  # a restart reads it back
    (item,) = again.client.get("/ssa", params={"org_id": "exact"}, headers=again.auth(ADMIN)).json()
    assert item["ssa"]["myCustomAttr1"] == value and type(item["ssa"]["myCustomAttr1"][0]) is int


@pytest.mark.parametrize("levels", [MAX_DEPTH, MAX_DEPTH + 1, 900, 30_000])
def test_nesting_deeper_than_the_limit_is_refused(api, levels):
    """The body object is level 1: an attribute may nest 31 more levels."""
    H = api.auth(ADMIN)
    r = post(api, b'{"org_id":"deep","myCustomAttr1":%s}' % nested(levels - 1).encode(), H)
    if levels <= MAX_DEPTH:
        assert r.status_code == 201, r.text
        (item,) = api.client.get("/ssa", params={"org_id": "deep"}, headers=H).json()
        assert json.dumps(item["ssa"]["myCustomAttr1"], separators=(",", ":")) == nested(levels - 1)
        return
    assert_invalid(r)
    assert str(MAX_DEPTH) in r.json()["error_description"]
    assert api.call(api.server.store.count_ssas) == 0


@pytest.mark.parametrize("raw", [nested(30_000).encode(), b'{"org_id":"x","junk":%s}' % nested(5000).encode(),
                                 b'{"org_id":"x","n":%s,"junk":%s}' % (BIG.encode(), nested(5000).encode()),
                                 b'[' * 30_000])
def test_deep_bodies_of_any_shape_are_refused(api, raw):
    assert_invalid(post(api, raw, api.auth(ADMIN)))


def test_the_store_refuses_what_would_not_read_back(make_store):
    async def go():
        s = await make_store()
        for custom in ({"x": float("nan")}, {"x": [float("inf")]}):
            with pytest.raises(UnstorableValue):
                await s.add_ssa(ssa("bad", custom=custom))
        assert await s.count_ssas() == 0
        await s.add_ssa(ssa("good"))
        await s.close()
        s = await make_store()
        assert [r["org_id"] for r in await s.find_ssas()] == ["good"]
        await s.close()
    asyncio.run(go())


def test_the_journal_refuses_keys_it_would_change(tmp_path):
    from ssa_server.store.tiny import TinyStore

    async def go():
        s = TinyStore(tmp_path)
        await s.open()
        with pytest.raises(UnstorableValue):  # written as "1": would read back as another value
            await s.add_ssa(ssa("bad", custom={1: "a"}))
        with pytest.raises(UnstorableValue):  # not UTF-8
            await s.put_template({"name": "t", "fields": {"org_id": "\udcff"}, "created_at": 1})
        assert await s.count_ssas() == 0 and await s.get_template("t") is None
        await s.close()
    asyncio.run(go())


# --- the CLI: --attr, templates, store import (real processes, both stores) ---
@pytest.fixture
def where(store_kind, tmp_path, request) -> list[str]:
    """The CLI flags that select the store under test."""
    if store_kind == "tinydb":
        return []
    url = request.getfixturevalue("pg_url")
    truncate(url)
    return ["--store-url", url]


def cli_bytes(tmp_path, where: list[str], *args: bytes) -> subprocess.CompletedProcess[str]:
    """The CLI with raw (non-UTF-8) arguments: Python reads them as lone surrogates."""
    argv = [sys.executable.encode(), b"-m", b"ssa_server", *args, b"--data-dir", str(tmp_path / "d").encode(),
            *(w.encode() for w in where)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=clean_env({"SSA_CUSTOM_ATTRIBUTES": "myattr"}))


def stored(tmp_path, where: list[str]) -> list[str]:
    r = run_cli(tmp_path / "d", "store", "export", *where)
    assert r.returncode == 0, r.stderr
    tables = [json.loads(line)["table"] for line in r.stdout.splitlines()]
    return [t for t in tables if t not in ("keys", "audit", "audit_checkpoints")]  # (the audit: below)


def test_cli_attr_and_template_values_are_checked(tmp_path, where):
    create = (b"ssa", b"create")
    line = one_line_failure(cli_bytes(tmp_path, where, *create, b"--org-id", b"o", b"--attr", b"myattr=\xff"))
    assert line.startswith("ssa-server: invalid_request")
    line = one_line_failure(cli_bytes(tmp_path, where, *create, b"--org-id", b"\xfe", b"--save-template",
                                      b"t"))
    assert line.startswith("ssa-server: invalid_request")
    assert stored(tmp_path, where) == []
    ok = cli_bytes(tmp_path, where, *create, b"--org-id", b"o", b"--attr", b"myattr=v", b"--save-template",
                   b"t")
    assert ok.returncode == 0, ok.stderr
    assert sorted(stored(tmp_path, where)) == ["ssa", "statuslists", "templates"]  # the SSA's status list too
    r = run_cli(tmp_path / "d", "audit", "list", *where)
    assert [e["action"] for e in json.loads(r.stdout)["events"]] == ["template.saved", "ssa.created"]


def _ssa_line(custom: str) -> str:
    record = json.dumps(ssa("imp"))[:-1] + ', "custom": %s}' % custom
    return '{"table": "ssa", "record": %s}\n' % record.replace('"custom": {"k": [1]}, ', "")


NOT_CANONICAL = [
    ('{"a": NaN}', "line 2 is not JSON"), ('{"a": Infinity}', "line 2 is not JSON"),
    ('{"a": [-Infinity]}', "line 2 is not JSON"),
    ('{"a": 1e400}', "line 2 holds a number beyond the float range"),
    ('{"a": [NaN, %s]}' % BIG, "line 2 is not JSON"),
    ('{"a": %s}' % nested(100_000), "line 2 is nested deeper than 34 levels"),
]


def test_import_refuses_values_that_are_not_canonical(tmp_path, where):
    good = _ssa_line('{"a": 1}')
    for custom, message in NOT_CANONICAL:
        result = run_cli(tmp_path / "d", "store", "import", "-", *where, stdin=good + _ssa_line(custom))
        line = one_line_failure(result)
        assert line.startswith("ssa-server: import: ") and message in line, (custom[:40], line)
    assert stored(tmp_path, where) == []


def test_an_export_at_the_nesting_limit_imports_back(make_api, tmp_path, store_kind):
    api = make_api(custom_attributes=("myCustomAttr1",), data_dir=tmp_path / "d")
    H = api.auth(ADMIN)
    deepest = b'{"org_id":"deep","myCustomAttr1":%s}' % nested(MAX_DEPTH - 1).encode()
    assert post(api, deepest, H).status_code == 201
    flags = [] if store_kind == "tinydb" else ["--store-url", api.server.settings.store_url]
    dump = run_cli(tmp_path / "d", "store", "export", *flags)
    assert dump.returncode == 0, dump.stderr
    back = run_cli(tmp_path / "back", "store", "import", "-", stdin=dump.stdout)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["ssa"]["imported"] == 1
