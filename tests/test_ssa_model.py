"""The SSA model (``ssa_server.ssa``) is the one place an SSA's fields are declared.

``check_every_place_follows_the_model`` fails when a field is added (or changed) in one place only:
the request parser, the flags of ``ssa create``, the OpenAPI request schema, the stored record (and
the embedded store's copies of it), the JWT claims and the GET /ssa element, the reserved attribute
names and the export's required fields must each hold exactly the model's fields, as the model
says.  The second test adds fields to a copy of ``ssa.py`` alone and runs the same check against it
in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import ssa_server.plugins
from ssa_server import cli, openapi, ssa, validation
from ssa_server.store import transfer
from ssa_server.errors import ApiError
from ssa_server.settings import Settings, SettingsError
from ssa_server.store.tiny import TinyStore

SERVER_CLAIMS = {"jti", "iat", "exp", "iss"}  # on every SSA's claims and element, set by the server
SERVER_FIELDS = {"custom", "jti", "created_at", "status", "creator_id", "iss", "scope",
                 "status_list", "hook_changes"}  # a record's, not a request's
NOT_FIELD_FLAGS = {"help", "config", "data_dir", "store_url", "attr", "template", "save_template"}


def sample(f: ssa.RequestField) -> Any:
    """A value of the field's kind that is not its default, as a body holds it."""
    return {"text": f"{f.name}-value", "texts": [f"{f.name}-1", f"{f.name}-2"],
            "boolean": f.default is not True, "epoch": 1_999_999_999, "seconds": 77}[f.kind]


WRONG = {"text": 5, "texts": "not a list", "boolean": "yes", "epoch": "soon", "seconds": "10"}


def flags(f: ssa.RequestField, value: Any) -> list[str]:
    if f.kind == "boolean":
        return [f"--{f.flag}" if value else f"--no-{f.flag}"]
    if f.kind == "texts":
        return [arg for item in value for arg in (f"--{f.flag}", item)]
    return [f"--{f.flag}", str(value)]


def create_subparser() -> argparse.ArgumentParser:
    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices[name]

    return sub(sub(cli.build_parser(), "ssa"), "create")


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: type(v) is int and v >= schema.get("minimum", v),
              "array": lambda v: isinstance(v, list) and all(conforms(i, schema["items"]) for i in v)}
    return any(checks[t](value) for t in types)


def check_every_place_follows_the_model() -> None:
    names = [f.name for f in ssa.REQUEST_FIELDS]
    body = {f.name: sample(f) for f in ssa.REQUEST_FIELDS}
    # The model itself: the request dataclass and the record's type spell the same fields.
    assert [f.name for f in fields(ssa.CreateRequest)] == [*names, "custom"]
    assert set(ssa.SsaRecord.__annotations__) == set(names) | SERVER_FIELDS

    # The parser reads every field by its kind (unknown keys dropped) and refuses a wrong kind.
    request = validation.parse_create_request(dict(body, unknown_key=1), ())
    assert {n: getattr(request, n) for n in names} == body
    for f in ssa.REQUEST_FIELDS:
        with pytest.raises(ApiError) as refused:
            validation.parse_create_request({f.name: WRONG[f.kind]}, ())
        assert refused.value.status == 400 and f.name in refused.value.description

    # ssa create: a flag per field and no other, giving the same fields as the body.
    assert {a.dest for a in create_subparser()._actions} - NOT_FIELD_FLAGS == set(names)
    argv = [arg for f in ssa.REQUEST_FIELDS for arg in flags(f, body[f.name])]
    args = cli.build_parser().parse_args(["ssa", "create", *argv])
    assert cli._create_fields(args) == body

    # The OpenAPI request schema: every field, of its kind, and no other.
    document = openapi.openapi_document("https://issuer.example")
    schema = document["paths"]["/ssa"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert list(schema["properties"]) == names
    for f in ssa.REQUEST_FIELDS:
        assert conforms(body[f.name], schema["properties"][f.name]), f.name
        if f.kind != "epoch":  # (an epoch may be a string of digits: only the parser refuses "soon")
            assert not conforms(WRONG[f.kind], schema["properties"][f.name]), f.name

    # The record holds every field; the claims and the element show what the model says.
    record = ssa.record_from_request(request, now=1_900_000_000, expiration_in_days=30, creator_id="c",
                                     issuer="https://issuer.example")
    assert set(record) == set(ssa.SsaRecord.__annotations__)
    assert {n: record[n] for n in names} == body  # type: ignore[literal-required]
    claims, element = ssa.jwt_claims(record), ssa.list_item(record)["ssa"]
    assert set(claims) == SERVER_CLAIMS | {f.name for f in ssa.REQUEST_FIELDS if f.claim}
    assert set(element) == SERVER_CLAIMS | {f.name for f in ssa.REQUEST_FIELDS if f.listed}
    for shown in (claims, element):
        fields_shown = [n for n in shown if n not in SERVER_CLAIMS]
        assert {n: shown[n] for n in fields_shown} == {n: body[n] for n in fields_shown}
    assert claims["exp"] == element["exp"] == body["expiration"]  # the one field shown under another name

    # No custom attribute may take a field's name.
    assert set(names) <= ssa.RESERVED_ATTRIBUTES
    for name in names:
        with pytest.raises(SettingsError):
            Settings(custom_attributes=(name,))

    # An export line holding the model's record imports; one without any required field does not.
    line = json.dumps({"table": "ssa", "record": record})
    assert transfer.parse_lines([line])["ssa"] == [record]
    for name in ssa.REQUIRED_RECORD_FIELDS:
        partial = {k: v for k, v in record.items() if k != name}
        with pytest.raises(transfer.TransferError, match=name):
            transfer.parse_lines([json.dumps({"table": "ssa", "record": partial})])
    defaults = ssa.record_from_request(ssa.CreateRequest(), now=1_900_000_000, expiration_in_days=30,
                                       creator_id="c", issuer="https://issuer.example")
    assert set(ssa.REQUIRED_RECORD_FIELDS) == {name for name, value in defaults.items() if value is not None}

    # The embedded store keeps its own copy of every field, and hands out copies a caller may change.
    with tempfile.TemporaryDirectory() as data_dir:
        asyncio.run(_stored_copies(data_dir, record))


async def _stored_copies(data_dir: str, record: ssa.SsaRecord) -> None:
    given, store = copy.deepcopy(record), TinyStore(data_dir)
    await store.open()
    try:
        await store.add_ssa(given)
        for name in ssa.LIST_FIELDS:
            given[name].append("changed by the caller")  # type: ignore[literal-required]
        got = await store.get_ssa(record["jti"])
        assert got == record
        for name in ssa.LIST_FIELDS:
            got[name].append("changed by the caller")  # type: ignore[literal-required]
        assert await store.get_ssa(record["jti"]) == record
    finally:
        await store.close()


def test_every_place_follows_the_model():
    check_every_place_follows_the_model()


def test_a_field_added_to_the_model_alone_reaches_every_place(tmp_path):
    """A copy of the package whose ``ssa.py`` alone has two more fields (a text and a list): the
    check holds for them too."""
    core, plugins = Path(ssa.__file__).parent, Path(ssa_server.plugins.__file__).parent
    package = tmp_path / "ssa_server"
    package.mkdir()
    for source in core.glob("*.py"):
        (package / source.name).symlink_to(source)
    (package / "plugins").symlink_to(plugins, target_is_directory=True)
    model = core.joinpath("ssa.py").read_text()
    request_anchor = '    lifetime: int | None = _field("seconds", None, "seconds")\n'
    record_anchor = "    lifetime: NotRequired[int | None]\n"
    assert model.count(request_anchor) == 1 and model.count(record_anchor) == 1
    added = ('    software_version: str = _field("text", "", "the software\'s version")\n'
             '    contacts: list[str] = _field("texts", list, "a contact (repeatable)", flag="contact")\n')
    model = model.replace(request_anchor, request_anchor + added)
    record_added = "    software_version: str\n    contacts: list[str]\n"
    model = model.replace(record_anchor, record_anchor + record_added)
    (package / "ssa.py").unlink()
    (package / "ssa.py").write_text(model)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_ssa_model as t; "
            "from ssa_server import ssa; assert ssa.__file__.startswith(sys.argv[2]), ssa.__file__; "
            "assert {'software_version', 'contacts'} <= {f.name for f in ssa.REQUEST_FIELDS}; "
            "t.check_every_place_follows_the_model(); print('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
                       capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
