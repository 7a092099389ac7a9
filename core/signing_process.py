"""EC and EdDSA signatures in a helper process, off the event loop.

An ECDSA or EdDSA signature costs 45-50 us on a warm core but 75-100 us on the event loop, where
the request's own Python has pushed the curve tables out of the caches; and a signing thread
waits for the GIL behind a busy loop after every signature.  A helper process signs on the other
core, and the signatures asked for in one loop turn (or while a batch is out) go in one frame, so
the loop pays ~15 us per signature instead.

The helper is a fresh interpreter (``python -I -m ssa_server.signing_process R W``) that gets
each private key once, over its pipe, the first time it must sign with it.  It is trusted code:
unlike the script workers it holds keys, and runs nothing else.  If it dies or stops answering,
the batch fails with ``SigningUnavailable`` (the caller signs inline) and the next signature
starts a fresh helper.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import subprocess
import sys
from typing import Any

from ssa_server.plugins.sandbox.protocol import (FrameBuffer, FrameError, dumps, loads, read_frame, read_ready,
                                                 write_raw_frame)

from .signing import b64url, signature_function

log = logging.getLogger("ssa_server.signing")

_TIMEOUT = 5.0  # seconds for one batch (a signature takes ~50 us): then the helper is replaced
_MAX_FRAME = 64 << 20
_PIPE_SAFE = 60 << 10  # a frame this small fits in an empty pipe buffer: the write cannot block


class SigningUnavailable(Exception):
    """The helper could not sign this batch (it died, hung or never started)."""


class SigningProcess:
    """The event loop's side of the helper: ``await sign(...)`` returns the base64url signature."""

    def __init__(self, timeout: float = _TIMEOUT) -> None:
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._to_child = self._from_child = -1
        self._known: set[str] = set()  # kids the helper holds
        self._queue: list[tuple[str, str, dict[str, Any], bytes, asyncio.Future[bytes]]] = []
        self._draining = False
        self._answer: asyncio.Future[bytes] | None = None
        self._frames = FrameBuffer()
        self._task: asyncio.Task[None] | None = None  # the drain running (the loop holds tasks weakly)

    async def sign(self, kid: str, alg: str, key: dict[str, Any], data: bytes) -> bytes:
        """The signature of ``data`` with private JWK ``key`` (kid ``kid``), base64url-encoded."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.start()
        future: asyncio.Future[bytes] = loop.create_future()
        self._queue.append((kid, alg, key, data, future))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Send what is queued, one batch at a time, until nothing is left."""
        try:
            await asyncio.sleep(0)  # the signatures asked for in this loop turn join the batch
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    signatures = await self._round_trip(batch)
                except Exception as e:  # SigningUnavailable, or a bug: the callers sign inline
                    if not isinstance(e, SigningUnavailable):
                        log.error("signing process failed: %s: %s", type(e).__name__, e)
                    self._stop()
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(SigningUnavailable(str(e)))
                    continue
                for (*_, future), signature in zip(batch, signatures):
                    if not future.done():
                        future.set_result(signature)
        finally:
            self._draining = False

    async def _round_trip(self, batch: list[tuple[str, str, dict[str, Any], bytes, asyncio.Future[bytes]]]) -> list[bytes]:
        loop = asyncio.get_running_loop()
        if self._proc is None:
            self.start()
        keys, jobs = [], []
        for kid, alg, key, data, _ in batch:
            if kid not in self._known:
                keys.append({"kid": kid, "alg": alg, "jwk": key})
                self._known.add(kid)
            jobs.append([kid, data.decode("ascii")])
        frame = dumps({"keys": keys, "jobs": jobs})
        self._answer = answer = loop.create_future()
        timer = loop.call_later(self.timeout, lambda: answer.done() or answer.set_exception(SigningUnavailable("timeout")))
        try:
            try:
                if len(frame) < _PIPE_SAFE:
                    write_raw_frame(self._to_child, frame)
                else:
                    await loop.run_in_executor(None, write_raw_frame, self._to_child, frame)
            except OSError:
                raise SigningUnavailable("the signing process exited") from None
            raw = await answer
        finally:
            timer.cancel()
            self._answer = None
        try:
            signatures = loads(raw)
        except ValueError:
            raise SigningUnavailable("malformed answer") from None
        if not isinstance(signatures, list) or len(signatures) != len(batch) or not all(isinstance(s, str) for s in signatures):
            raise SigningUnavailable("malformed answer")
        return [s.encode("ascii") for s in signatures]

    def _on_readable(self) -> None:
        chunk = read_ready(self._from_child)
        if chunk is None:
            return
        answer = self._answer
        if not chunk:
            self._loop.remove_reader(self._from_child)  # type: ignore[union-attr]
            if answer is not None and not answer.done():
                answer.set_exception(SigningUnavailable("the signing process exited"))
            return
        self._frames.feed(chunk)
        frame = self._frames.pop()
        if frame is not None and answer is not None and not answer.done():
            answer.set_result(frame)

    def start(self) -> None:
        """Start a fresh helper for the running event loop (else the first signature does)."""
        loop = asyncio.get_running_loop()
        self._stop()
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "ssa_server.signing_process", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            for fd in (self._to_child, self._from_child):
                os.close(fd)
            raise SigningUnavailable(f"cannot start the signing process: {e.strerror}") from None
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        os.set_blocking(self._from_child, False)
        self._loop = loop
        self._known.clear()
        self._frames = FrameBuffer()
        loop.add_reader(self._from_child, self._on_readable)

    def _stop(self) -> None:
        if self._proc is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._from_child)
        self._proc.kill()
        self._proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._proc = None

    def close(self) -> None:
        self._stop()
        self._loop = None


def main() -> None:
    """The helper: a private key per kid, a list of signatures per frame."""
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file holding the keys
    signers: dict[str, Any] = {}
    while True:
        try:
            request = read_frame(rfd, _MAX_FRAME)
        except FrameError:
            return
        for key in request["keys"]:
            signers[key["kid"]] = signature_function(key["jwk"], key["alg"])
        write_raw_frame(wfd, dumps([b64url(signers[kid](data.encode("ascii"))).decode("ascii")
                                    for kid, data in request["jobs"]]))


if __name__ == "__main__":
    main()
