"""The server's signing process (EC and EdDSA signatures off the event loop): the signatures
verify, concurrent ones share a frame, and a dead or hung helper never fails a create."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from jwcrypto import jwk, jws

from ssa_server.keys import KeyRing, generate_key
from ssa_server.signing import Signer
from ssa_server.signing_process import SigningProcess, SigningUnavailable
from ssa_server.store.tiny import TinyStore

ALGS = ["ES256", "ES384", "ES512", "EdDSA"]


def verify(token: str, record: dict) -> dict:
    key = jwk.JWK(**record["jwk"])
    parsed = jws.JWS()
    parsed.deserialize(token)
    parsed.verify(key, alg=record["alg"])
    return parsed.jose_header


def sign_many(process: SigningProcess, record: dict, count: int) -> list[str]:
    signer = Signer(record["jwk"], record["alg"], record["kid"])

    async def one(i: int) -> str:
        data = signer.signing_input({"typ": "jwt"}, {"jti": f"j{i}"})
        return (data + b"." + await process.sign(record["kid"], record["alg"], record["jwk"], data)).decode()

    async def go() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(count)))

    return asyncio.run(go())


@contextlib.asynccontextmanager
async def es256_ring(path):
    """An ES256 key ring on a fresh store, signing as the server does, and its signing process."""
    store = TinyStore(path)
    await store.open()
    keys = KeyRing(store, "ES256")
    await keys.load()
    keys.start_signing()
    try:
        yield keys, keys.signing_process
    finally:
        keys.close()
        await store.close()


@pytest.fixture
def process():
    p = SigningProcess(timeout=2.0)
    yield p
    p.close()


@pytest.mark.parametrize("alg", ALGS)
def test_signatures_verify(process, alg):
    record = generate_key(alg, "ssa", int(time.time()))
    tokens = sign_many(process, record, 20)
    assert len(set(tokens)) == 20
    for token in tokens:
        assert verify(token, record)["kid"] == record["kid"]


def test_concurrent_signatures_share_a_frame(process, monkeypatch):
    frames: list[int] = []
    original = SigningProcess._round_trip

    async def counting(self, batch):
        frames.append(len(batch))
        return await original(self, batch)

    monkeypatch.setattr(SigningProcess, "_round_trip", counting)
    sign_many(process, generate_key("ES256", "ssa", int(time.time())), 30)
    assert frames == [30]


def test_two_keys_in_one_batch(process):
    a, b = (generate_key(alg, "ssa", int(time.time())) for alg in ("ES256", "EdDSA"))
    sa, sb = Signer(a["jwk"], a["alg"], a["kid"]), Signer(b["jwk"], b["alg"], b["kid"])

    async def go():
        da, db = sa.signing_input({}, {"x": 1}), sb.signing_input({}, {"x": 2})
        return await asyncio.gather(process.sign(a["kid"], a["alg"], a["jwk"], da),
                                    process.sign(b["kid"], b["alg"], b["jwk"], db),
                                    return_exceptions=False), da, db

    (siga, sigb), da, db = asyncio.run(go())
    verify((da + b"." + siga).decode(), a)
    verify((db + b"." + sigb).decode(), b)


def test_a_killed_helper_fails_its_batch_and_is_replaced(process):
    record = generate_key("ES256", "ssa", int(time.time()))
    signer = Signer(record["jwk"], record["alg"], record["kid"])
    data = signer.signing_input({}, {"x": 1})

    async def go():
        await process.sign(record["kid"], record["alg"], record["jwk"], data)
        first = process.pid
        os.kill(first, signal.SIGKILL)
        await asyncio.sleep(0.2)
        with pytest.raises(SigningUnavailable):
            await process.sign(record["kid"], record["alg"], record["jwk"], data)
        sig = await process.sign(record["kid"], record["alg"], record["jwk"], data)  # a fresh helper
        return first, process.pid, sig

    first, second, sig = asyncio.run(go())
    assert first != second
    verify((data + b"." + sig).decode(), record)


def test_a_hung_helper_times_out(process):
    record = generate_key("ES256", "ssa", int(time.time()))
    data = Signer(record["jwk"], record["alg"], record["kid"]).signing_input({}, {"x": 1})

    async def go():
        await process.sign(record["kid"], record["alg"], record["jwk"], data)
        os.kill(process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(SigningUnavailable):
            await process.sign(record["kid"], record["alg"], record["jwk"], data)
        return (time.monotonic() - started,
                await process.sign(record["kid"], record["alg"], record["jwk"], data))

    waited, sig = asyncio.run(go())
    assert 1.5 < waited < 10
    verify((data + b"." + sig).decode(), record)


def test_the_key_ring_signs_inline_when_the_helper_is_gone(tmp_path):
    """A create never fails because of the helper: KeyRing.sign falls back to the loop."""
    async def go():
        async with es256_ring(tmp_path) as (keys, process):
            await keys.sign({"typ": "jwt"}, {"jti": "a"})
            os.kill(process.pid, signal.SIGKILL)
            await asyncio.sleep(0.2)
            return await keys.sign({"typ": "jwt"}, {"jti": "b"}), keys.active()

    token, record = asyncio.run(go())
    assert verify(token, record)["alg"] == "ES256"


def test_a_new_event_loop_gets_a_fresh_helper(process):
    record = generate_key("ES256", "ssa", int(time.time()))
    first = sign_many(process, record, 2)
    pid = process.pid
    second = sign_many(process, record, 2)
    assert process.pid != pid
    for token in first + second:
        verify(token, record)


@pytest.mark.parametrize("store_kind", ["tinydb"])
def test_es256_creates_over_http_go_through_the_helper_and_survive_its_death(make_api):
    api = make_api(signing_alg="ES256")
    helper = api.server.keys.signing_process
    assert helper is not None and helper.pid is not None  # started with the server (active alg ES256)
    first = api.create(org_id="o", software_id="s")
    assert first.status_code == 201 and api.verify(first.json()["ssa"])[0]["alg"] == "ES256"
    pid = helper.pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    for _ in range(3):  # the batch the dead helper fails is signed inline; then a fresh helper
        r = api.create(org_id="o", software_id="s")
        assert r.status_code == 201, r.text
        assert api.verify(r.json()["ssa"])[0]["alg"] == "ES256"
    assert helper.pid is not None and helper.pid != pid


def test_a_helper_that_cannot_start_leaves_signing_inline(tmp_path, monkeypatch):
    """No process can be spawned (say, out of file descriptors): signatures are made inline."""
    import subprocess

    def refuse(*args, **kwargs):
        raise OSError(24, "Too many open files")

    async def go():
        async with es256_ring(tmp_path) as (keys, process):
            monkeypatch.setattr(subprocess, "Popen", refuse)
            with pytest.raises(SigningUnavailable):
                process.start()
            tokens = await asyncio.gather(*(keys.sign({"typ": "jwt"}, {"jti": str(i)}) for i in range(3)))
            return tokens, keys.active()

    tokens, record = asyncio.run(go())
    assert all(verify(t, record)["alg"] == "ES256" for t in tokens)


# --- signing behind one call: the key ring owns its threads and its helper (issue 12, item 4) ---

def test_the_key_ring_signs_rsa_in_its_own_threads_once_started(tmp_path, monkeypatch):
    """Before ``start_signing`` (the CLI) and after ``close`` an RSA signature is made inline;
    in between in one of the key ring's signing threads (an RSA signature releases the GIL)."""
    threads: list[str] = []
    original = Signer.sign

    def recording(self, header, claims):
        threads.append(threading.current_thread().name)
        return original(self, header, claims)

    monkeypatch.setattr(Signer, "sign", recording)

    async def go():
        store = TinyStore(tmp_path)
        await store.open()
        keys = KeyRing(store, "RS256")
        await keys.load()
        try:
            tokens = [await keys.sign({"typ": "jwt"}, {"jti": "inline"})]
            keys.start_signing()
            tokens += await asyncio.gather(*(keys.sign({"typ": "jwt"}, {"jti": str(i)}) for i in range(3)))
            keys.close()
            tokens.append(await keys.sign({"typ": "jwt"}, {"jti": "closed"}))
            return tokens, keys.active()
        finally:
            keys.close()
            await store.close()

    tokens, record = asyncio.run(go())
    main = threading.current_thread().name
    assert threads[0] == main and threads[-1] == main
    assert len(threads) == 5 and all(name.startswith("ssa-sign") for name in threads[1:4]), threads
    assert all(verify(t, record)["alg"] == "RS256" for t in tokens)


def test_the_key_ring_starts_and_stops_its_signing_helper(tmp_path):
    """``start_signing`` starts the helper for an EC key at once; ``close`` kills and reaps it;
    a signature after that is made inline."""
    async def go():
        store = TinyStore(tmp_path)
        await store.open()
        keys = KeyRing(store, "ES256")
        await keys.load()
        try:
            keys.start_signing()
            helper = keys.signing_process
            assert helper is not None and helper.pid is not None  # before the first signature
            pid = helper.pid
            first = await keys.sign({"typ": "jwt"}, {"jti": "a"})
            assert helper.pid == pid
            keys.close()
            assert not Path(f"/proc/{pid}").exists()  # killed and reaped
            return [first, await keys.sign({"typ": "jwt"}, {"jti": "b"})], keys.active()
        finally:
            keys.close()
            await store.close()

    tokens, record = asyncio.run(go())
    assert all(verify(t, record)["alg"] == "ES256" for t in tokens)


@pytest.mark.parametrize("store_kind", ["tinydb"])
def test_the_server_stops_its_signing_helper(make_api):
    api = make_api(signing_alg="ES256")
    helper = api.server.keys.signing_process
    assert helper is not None and helper.pid is not None
    pid = helper.pid
    assert api.create(org_id="o", software_id="s").status_code == 201
    api.client.__exit__(None, None, None)  # the lifespan's Server.stop
    assert not Path(f"/proc/{pid}").exists()
    assert api.server.keys.signing_process is None
