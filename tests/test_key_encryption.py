"""Private keys encrypted at rest (issue 16): real servers, the CLI as processes, both stores.

The journal, a PostgreSQL dump of the keys table and ``store export`` are searched for the JWK
private members and for the private values themselves (decrypted here with the master key, by
the format ``docs/keys.md`` gives).  Start-up without the right master key is one line naming
the kid; ``keys rewrap`` killed part-way loses no key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from faults.served import Served
from jwcrypto import jwk, jws
from ports import free_port

pytestmark = pytest.mark.slow

PRIVATE_MEMBER = re.compile(r'"(d|p|q|dp|dq|qi|k|oth)"\s*:')


@pytest.fixture(params=["tinydb", "postgresql"])
def store_kind(request) -> str:
    return request.param


def new_master_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def run(*args: str, env: dict[str, str] | None = None, data: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    full.update(env or {})
    where = ["--data-dir", str(data)] if data is not None else []
    return subprocess.run([sys.executable, "-m", "ssa_server", *args, *where], capture_output=True, text=True,
                          timeout=timeout, env=full)


def ok(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    r = run(*args, **kw)
    assert r.returncode == 0, r.stderr
    return r


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decrypt(record: dict, master: str) -> dict:
    """The private members of a stored key record, decrypted as docs/keys.md describes."""
    sealed = record["jwk_encrypted"]
    assert sealed["v"] == 1 and set(sealed) == {"v", "kek", "nonce", "ciphertext"}
    plain = AESGCM(_unb64(master)).decrypt(_unb64(sealed["nonce"]), _unb64(sealed["ciphertext"]),
                                           f"ssa-server key v1 {record['kid']}".encode())
    return json.loads(plain)


def export_keys(env: dict[str, str], data: Path, *flags: str) -> tuple[str, list[dict]]:
    text = ok("store", "export", *flags, env=env, data=data).stdout
    keys = [e["record"] for e in map(json.loads, text.splitlines()) if e["table"] == "keys"]
    return text, keys


def journal_key_records(data: Path) -> list[dict]:
    lines = (data / "store.jsonl").read_text().splitlines()
    return [e["doc"] for e in map(json.loads, lines) if e.get("t") == "keys" and "doc" in e]


def pg_dump_keys(url: str) -> str:
    pg_dump = shutil.which("pg_dump") or max(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"))
    r = subprocess.run([str(pg_dump), "--data-only", "--table=keys", "--dbname", url], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def assert_no_private_material(text: str, secrets: list[str], where: str) -> None:
    assert not PRIVATE_MEMBER.search(text), f"{where} holds a JWK private member"
    for value in secrets:
        assert value not in text, f"{where} holds a private key value"


def private_values(keys: list[dict], master: str) -> list[str]:
    values = [v for r in keys for v in decrypt(r, master).values()]
    assert values and all(isinstance(v, str) and len(v) >= 16 for v in values)
    return values


def served(tmp_path: Path, store_kind: str, request, **env: str) -> Served:
    if store_kind == "postgresql":
        env["SSA_STORE_URL"] = request.getfixturevalue("store_settings")["store_url"]
    return Served(tmp_path, **env)


def cli_env(server: Served) -> dict[str, str]:
    return {k: v for k, v in server.env.items() if k.startswith("SSA_")}


def create_ssa(server: Served, headers: dict[str, str]) -> str:
    r = server.http.post("/ssa", json={"org_id": "acme", "one_time_use": False}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["ssa"]


def verifies(server: Served, token: str) -> bool:
    keys = jwk.JWKSet.from_json(server.http.get("/jwks").text)
    parsed = jws.JWS()
    parsed.deserialize(token)
    try:
        parsed.verify(keys)
    except Exception:
        return False
    return True


def kid_of(token: str) -> str:
    return json.loads(_unb64(token.split(".")[0]))["kid"]


def test_encrypted_at_rest_in_the_store_its_dump_and_its_export(tmp_path, store_kind, request):
    master = new_master_key()
    server = served(tmp_path, store_kind, request, SSA_KEY_ENCRYPTION_KEY="env:TEST_KEK", TEST_KEK=master,
                    SSA_SIGNING_ALG="ES256", SSA_KEY_REFRESH_INTERVAL="0.2")
    try:
        server.start()
        headers = server.token()  # the access-token key signs: it is a private key too
        first = create_ssa(server, headers)
        env = dict(cli_env(server), TEST_KEK=master)
        ok("keys", "rotate", "--now", env=env, data=server.data)  # a key made by the CLI beside the server
        deadline = time.time() + 15  # the server's key refresh (0.2 s) picks the new key up
        while kid_of(second := create_ssa(server, headers)) == kid_of(first) and time.time() < deadline:
            time.sleep(0.2)
        assert kid_of(first) != kid_of(second) and verifies(server, first) and verifies(server, second)
        assert "private keys are stored in the clear" not in server.log()
    finally:
        server.kill()

    text, keys = export_keys(env, server.data)
    assert len(keys) == 3 and all(set(r["jwk"]).isdisjoint({"d", "k"}) for r in keys)
    assert {r["use"] for r in keys} == {"ssa", "token"}
    secrets = private_values(keys, master)
    assert_no_private_material(text, secrets, "the export")
    if store_kind == "tinydb":
        journal = (server.data / "store.jsonl").read_text()
        assert journal_key_records(server.data)
        assert_no_private_material(journal, secrets, "the journal")
        asyncio.run(_compact(server.data))  # and after a compaction (the cleaner's runs only on garbage)
        compacted = (server.data / "store.jsonl").read_text()
        assert_no_private_material(compacted, secrets, "the compacted journal")
    else:
        assert_no_private_material(pg_dump_keys(server.env["SSA_STORE_URL"]), secrets, "pg_dump of keys")


async def _compact(data: Path) -> None:
    from ssa_server.store.tiny import TinyStore

    store = TinyStore(data, exclusive=True)
    await store.open()
    try:
        assert await store.compact_keys()
    finally:
        await store.close()


def test_clear_keys_are_encrypted_at_start_and_their_old_versions_dropped(tmp_path, store_kind, request):
    server = served(tmp_path, store_kind, request)
    try:
        server.start()
        headers = server.token()
        before = create_ssa(server, headers)
        assert "private keys are stored in the clear" in server.log()
    finally:
        server.kill()
    env = cli_env(server)
    shown = json.loads(ok("config", "show", env=env, data=server.data).stdout)
    assert shown["private_keys_at_rest"].startswith("in the clear")
    _, clear = export_keys(env, server.data)
    secrets = [v for r in clear for k, v in r["jwk"].items() if k in ("d", "k")]
    assert len(secrets) == 2

    master = new_master_key()
    server.env.update(SSA_KEY_ENCRYPTION_KEY="env:TEST_KEK", TEST_KEK=master)
    env = dict(cli_env(server), TEST_KEK=master)
    shown = json.loads(ok("config", "show", env=env, data=server.data).stdout)
    assert shown["private_keys_at_rest"].startswith("encrypted") and master not in json.dumps(shown)
    assert shown["key_encryption_key"] == "env:TEST_KEK"
    try:
        server.start()
        assert "2 private keys encrypted under key_encryption_key" in server.log()
        assert verifies(server, before)
        after = create_ssa(server, server.token())  # (a new port is a new issuer: a new token)
        assert kid_of(after) == kid_of(before) and verifies(server, after)
    finally:
        server.kill()
    text, keys = export_keys(env, server.data)
    assert sorted(v for v in private_values(keys, master) if v in secrets) == sorted(secrets)
    assert_no_private_material(text, secrets, "the export")
    if store_kind == "tinydb":
        assert_no_private_material((server.data / "store.jsonl").read_text(), secrets, "the journal")
    else:
        assert_no_private_material(pg_dump_keys(server.env["SSA_STORE_URL"]), secrets, "pg_dump of keys")


def _start_fails(server: Served) -> str:
    """``serve``'s stderr when it exits at start-up (it must)."""
    proc = subprocess.run([sys.executable, "-m", "ssa_server", "serve", "--port", str(free_port()),
                           "--data-dir", str(server.data), "--scripts-dir", str(server.scripts)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, **server.env))
    assert proc.returncode != 0
    return proc.stderr


def test_start_without_the_right_master_key_is_one_line_naming_the_kid(tmp_path):
    master = new_master_key()
    env = {"SSA_KEY_ENCRYPTION_KEY": "env:TEST_KEK", "TEST_KEK": master}
    made = json.loads(ok("keys", "rotate", env=env, data=tmp_path / "data").stdout)
    server = Served(tmp_path)
    for changes, words in (({}, "is stored encrypted and no key_encryption_key is set"),
                           ({"SSA_KEY_ENCRYPTION_KEY": "env:TEST_KEK", "TEST_KEK": new_master_key()},
                            "is encrypted under master key")):
        server.env = changes
        err = _start_fails(server)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert words in lines[0] and re.search(r"key (ssa|token)_[0-9a-f-]+_sig_\w+ ", lines[0]), lines[0]
        assert master not in err and (changes.get("TEST_KEK") or master) not in err
    assert made["kid"]

    # A literal key where a reference belongs is refused, without echoing it.
    for bad in ({"SSA_KEY_ENCRYPTION_KEY": master},):
        r = run("config", "show", env=bad, data=tmp_path / "data")
        assert r.returncode == 2 and "must be a reference" in r.stderr and master not in r.stderr
    toml = tmp_path / "ssa.toml"
    toml.write_text(f'key_encryption_key = "{master}"\n')
    r = run("config", "show", "--config", str(toml), data=tmp_path / "data")
    assert r.returncode == 2 and "must be a reference" in r.stderr and master not in r.stderr
    short = {"SSA_KEY_ENCRYPTION_KEY": "env:TEST_KEK", "TEST_KEK": "dG9vIHNob3J0"}
    r = run("keys", "list", env=short, data=tmp_path / "data")
    assert r.returncode == 2 and "32 random bytes as base64url" in r.stderr, r.stderr


async def _seed(data: Path, master: str, count: int) -> list[str]:
    """A store with ``count`` encrypted keys (retired HMAC keys besides the signing ones)."""
    from ssa_server.key_encryption import KeyEncryption
    from ssa_server.keys import TOKEN_USE, generate_key
    from ssa_server.store.tiny import TinyStore

    enc = KeyEncryption(_unb64(master))
    store = TinyStore(data, exclusive=True)
    await store.open()
    try:
        now = int(time.time())
        for _ in range(count):
            await store.add_key(enc.seal(dict(generate_key("HS256", TOKEN_USE, now - 10), status="retired")))
        return [k["kid"] for k in await store.list_keys()]
    finally:
        await store.close()


def test_rewrap_killed_part_way_loses_no_key(tmp_path):
    data = tmp_path / "data"
    old, new = new_master_key(), new_master_key()
    env_old = {"SSA_KEY_ENCRYPTION_KEY": "env:OLD_KEK", "OLD_KEK": old}
    ok("keys", "rotate", env=env_old, data=data)  # the signing keys (ssa and token)
    kids = asyncio.run(_seed(data, old, 300))
    assert len(kids) == 303
    journal = data / "store.jsonl"
    lines = len(journal.read_bytes().splitlines())

    full = {k: v for k, v in os.environ.items() if not k.startswith("SSA_")}
    proc = subprocess.Popen([sys.executable, "-m", "ssa_server", "keys", "rewrap", "--new-key", "env:NEW_KEK",
                             "--data-dir", str(data)], env=dict(full, **env_old, NEW_KEK=new),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    written = 0
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        written = len(journal.read_bytes().splitlines()) - lines
        if written >= 20:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "the rewrap ended before it could be killed part-way"
    assert 0 < written < 303

    # Part-way: the old master key alone no longer opens every key, and says which it cannot.
    r = run("keys", "list", env=env_old, data=data)
    assert r.returncode == 1 and "is encrypted under master key" in r.stderr and "Traceback" not in r.stderr

    # The new key with the old one as previous opens both; the start rewrites the rest under the new.
    both = {"SSA_KEY_ENCRYPTION_KEY": "env:NEW_KEK", "NEW_KEK": new,
            "SSA_KEY_ENCRYPTION_KEY_PREVIOUS": "env:OLD_KEK", "OLD_KEK": old}
    server = Served(tmp_path, **both)
    try:
        server.start()
        assert "private keys encrypted under key_encryption_key" in server.log()
        headers = server.token()
        assert verifies(server, create_ssa(server, headers))
    finally:
        server.kill()
    only_new = {"SSA_KEY_ENCRYPTION_KEY": "env:NEW_KEK", "NEW_KEK": new}
    listed = json.loads(ok("keys", "list", env=only_new, data=data).stdout)
    assert set(kids) <= {k["kid"] for k in listed}
    _, keys = export_keys(only_new, data)
    assert all(decrypt(r, new) for r in keys)  # every record opens under the new key alone
    from ssa_server.key_encryption import key_id

    # The start compacted the journal: no version of a record under the old master key is left.
    assert {r["jwk_encrypted"]["kek"] for r in journal_key_records(data)} == {key_id(_unb64(new))}

    # A second rewrap finds nothing left to do (idempotent: a rewrap is simply run again).
    again = json.loads(ok("keys", "rewrap", "--new-key", "env:NEW_KEK", env=only_new, data=data).stdout)
    assert again["rewrapped"] == 0 and again["keys"] == len(keys)


def test_export_without_private_keys_imports_verify_only(tmp_path):
    master = new_master_key()
    env = {"SSA_KEY_ENCRYPTION_KEY": "env:TEST_KEK", "TEST_KEK": master}
    source = Served(tmp_path / "a", **env)
    try:
        source.start()
        headers = source.token()
        old_ssa = create_ssa(source, headers)
    finally:
        source.kill()
    text, keys = export_keys(env, source.data, "--no-private-keys")
    assert keys and "jwk_encrypted" not in text and not PRIVATE_MEMBER.search(text)

    # An encrypted export carries the ciphertext: importing it needs the same master key.
    sealed, sealed_keys = export_keys(env, source.data)
    assert len(sealed_keys) == len(keys) + 1  # the access-token key: HMAC, no public part to export
    copy = tmp_path / "copy"
    subprocess.run([sys.executable, "-m", "ssa_server", "store", "import", "-", "--data-dir", str(copy)],
                   input=sealed, text=True, check=True, capture_output=True, timeout=60)
    r = run("keys", "list", data=copy)
    assert r.returncode == 1 and "no key_encryption_key is set" in r.stderr
    assert len(json.loads(ok("keys", "list", env=env, data=copy).stdout)) == len(sealed_keys)

    target = Served(tmp_path / "b")
    subprocess.run([sys.executable, "-m", "ssa_server", "store", "import", "-", "--data-dir",
                    str(target.data)], input=text, text=True, check=True, capture_output=True, timeout=60)
    imported = json.loads(ok("keys", "list", data=target.data).stdout)
    assert {k["status"] for k in imported} == {"retiring"}
    try:
        target.start()
        assert verifies(target, old_ssa)  # the imported public key verifies what it signed
        new_ssa = create_ssa(target, target.token())  # signed by a key the target made
        assert kid_of(new_ssa) not in {k["kid"] for k in imported} and verifies(target, new_ssa)
    finally:
        target.kill()


def test_rewrap_on_postgresql_beside_the_store(tmp_path, pg_url):
    from conftest import truncate
    from ssa_server.key_encryption import key_id

    truncate(pg_url)
    old, new = new_master_key(), new_master_key()
    env = {"SSA_STORE_URL": pg_url, "SSA_KEY_ENCRYPTION_KEY": "env:OLD_KEK", "OLD_KEK": old}
    ok("keys", "rotate", env=env, data=tmp_path)
    done = json.loads(ok("keys", "rewrap", "--new-key", "env:NEW_KEK", env=dict(env, NEW_KEK=new),
                         data=tmp_path).stdout)
    assert done["rewrapped"] == done["keys"] == 3 and done["master_key"] == key_id(_unb64(new))
    only_new = {"SSA_STORE_URL": pg_url, "SSA_KEY_ENCRYPTION_KEY": "env:NEW_KEK", "NEW_KEK": new}
    assert len(json.loads(ok("keys", "list", env=only_new, data=tmp_path).stdout)) == 3
    dump = pg_dump_keys(pg_url)
    assert key_id(_unb64(new)) in dump and key_id(_unb64(old)) not in dump and not PRIVATE_MEMBER.search(dump)
    r = run("keys", "list", env=env, data=tmp_path)
    assert r.returncode == 1 and "is encrypted under master key" in r.stderr


def test_a_ciphertext_moved_or_altered_does_not_open_and_a_fifo_is_not_waited_on(tmp_path):
    from ssa_server.key_encryption import KeyDecryptionError, KeyEncryption
    from ssa_server.keys import SSA_USE, generate_key

    enc = KeyEncryption(os.urandom(32))
    a, b = (enc.seal(generate_key("ES256", SSA_USE, 0)) for _ in range(2))
    assert enc.open(a)["d"] and "d" not in a["jwk"]
    assert a["jwk_encrypted"]["nonce"] != enc.seal(dict(a, jwk=enc.open(a)))["jwk_encrypted"]["nonce"]
    moved = dict(a, jwk_encrypted=b["jwk_encrypted"])
    altered = dict(a, jwk_encrypted=dict(a["jwk_encrypted"], v=2))
    for bad, words in ((moved, "the record was altered"), (altered, "unknown format")):
        with pytest.raises(KeyDecryptionError, match=words):
            enc.open(bad)

    fifo = tmp_path / "kek"
    os.mkfifo(fifo)
    r = run("keys", "list", env={"SSA_KEY_ENCRYPTION_KEY": f"file:{fifo}"}, data=tmp_path / "data",
            timeout=30)
    assert r.returncode == 2 and "is not a regular file" in r.stderr, r.stderr
    key_file = tmp_path / "kek.txt"
    key_file.write_text(new_master_key() + "\n")
    ok("keys", "list", env={"SSA_KEY_ENCRYPTION_KEY": f"file:{key_file}"}, data=tmp_path / "data")
