"""EC and EdDSA signatures in a helper process, off the event loop.

An ECDSA or EdDSA signature costs more on the event loop than on a warm core (the request's own
Python has pushed the curve tables out of the caches), and a signing thread waits for the GIL
behind a busy loop after every signature.  A helper process signs on the other core, and the
signatures asked for in one loop turn (or while a batch is out) go in one frame, so the loop pays
a share of one round trip per signature instead (the figures: ``bench/README.md``).

The helper is a fresh interpreter (``python -I -m ssa_server.signing_process R W``, started by
``helper_process.HelperProcess``) that gets each private key once, over its pipe, the first time
it must sign with it.  It is trusted code: unlike the script workers it holds keys, and runs
nothing else; it loads nothing of the plugins or the sandbox.  If it dies or stops answering,
the batch fails with ``SigningUnavailable`` (the caller signs inline) and the next signature
starts a fresh helper.  ``KeyRing`` owns it (``start_signing``, ``close``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from .frames import FrameError, dumps, loads, read_frame, write_raw_frame
from .helper_process import AnswerReader, HelperProcess, Job
from .signing import b64url, signature_function

log = logging.getLogger("ssa_server.signing")

_MODULE = "ssa_server.signing_process"
_TIMEOUT = 5.0  # seconds for one batch (far more than a signature takes): then the helper is replaced
_MAX_FRAME = 64 << 20


class SigningUnavailable(Exception):
    """The helper could not sign this batch (it died, hung or never started)."""


@dataclass(eq=False)
class _Signature(Job):
    kid: str
    alg: str
    key: dict[str, Any]
    data: bytes


class SigningProcess:
    """The event loop's side of the helper: ``await sign(...)`` returns the base64url signature.

    One batch is out at a time.  A drain task sends the signatures asked for in one loop turn,
    then, the moment each answer lands, everything asked for while it was out, until nothing
    waits.  (Not ``helper_process.LoopTurnBatcher``, which gathers anew for each batch and waits
    for a free helper: with one helper kept busy back to back, that cost a loop turn or two per
    batch, the helper idle meanwhile; measured in ``bench/README.md``.)"""

    def __init__(self, timeout: float = _TIMEOUT) -> None:
        self.timeout = timeout
        self._helper: HelperProcess | None = None
        self._answers: AnswerReader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known: set[str] = set()  # kids the helper holds
        self._queue: list[_Signature] = []  # asked for, not yet sent
        self._drain: asyncio.Task[None] | None = None  # the loop holds tasks weakly

    @property
    def pid(self) -> int | None:
        """The running helper's process id."""
        return self._helper.pid if self._helper is not None else None

    async def sign(self, kid: str, alg: str, key: dict[str, Any], data: bytes) -> bytes:
        """The signature of ``data`` with private JWK ``key`` (kid ``kid``), base64url-encoded."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self.start()
        job = _Signature(loop.create_future(), loop.time(), kid, alg, key, data)
        self._queue.append(job)
        if self._drain is None:
            self._drain = loop.create_task(self._send_all())
        return await job.future

    async def _send_all(self) -> None:
        """Send what is queued, one batch at a time, until nothing is left.  A caller that is
        cancelled cancels only its own future; this task settles everyone else's."""
        batch: list[_Signature] = []
        try:
            await asyncio.sleep(0)  # the signatures asked for in this loop turn join the batch
            while self._queue:
                batch, self._queue = [j for j in self._queue if not j.future.done()], []
                if not batch:
                    continue
                try:
                    signatures = await self._round_trip(batch)
                except Exception as e:  # SigningUnavailable, or a bug: the callers sign inline
                    if not isinstance(e, SigningUnavailable):
                        log.error("signing process failed: %s: %s", type(e).__name__, e)
                    self._stop()  # its answer, should it still come, must not be taken for the next batch's
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(SigningUnavailable(str(e) or type(e).__name__))
                    continue
                for job, signature in zip(batch, signatures):
                    if not job.future.done():
                        job.future.set_result(signature)
                batch = []
        except BaseException:  # cancelled (the loop ends): nobody gets an answer
            self._stop()
            for job in batch + self._queue:
                job.future.cancel()
            self._queue = []
            raise
        finally:
            self._drain = None

    async def _round_trip(self, batch: list[_Signature]) -> list[bytes]:
        if self._helper is None:
            self._spawn()
        assert self._helper is not None and self._answers is not None
        keys, jobs = [], []
        for job in batch:
            if job.kid not in self._known:
                keys.append({"kid": job.kid, "alg": job.alg, "jwk": job.key})
                self._known.add(job.kid)
            jobs.append([job.kid, job.data.decode("ascii")])
        answer = self._answers.expect(_MAX_FRAME, self.timeout)  # the clock runs from before the write
        try:
            sending = self._helper.send(dumps({"keys": keys, "jobs": jobs}))
            if sending is not None:
                await sending
        except OSError:
            answer.cancel()
            raise SigningUnavailable("the signing process exited") from None
        try:
            raw = await answer
        except FrameError:
            raise SigningUnavailable("the signing process exited") from None
        except TimeoutError:
            raise SigningUnavailable("timeout") from None
        try:
            signatures = loads(raw)
        except ValueError:
            raise SigningUnavailable("malformed answer") from None
        if not isinstance(signatures, list) or len(signatures) != len(batch) \
                or not all(isinstance(s, str) for s in signatures):
            raise SigningUnavailable("malformed answer")
        return [s.encode("ascii") for s in signatures]

    def start(self) -> None:
        """Start a fresh helper for the running event loop (else the first signature does)."""
        loop = asyncio.get_running_loop()
        self._stop()
        if self._loop is not loop:  # what was queued or draining on a loop that ended is no one's
            self._loop, self._queue, self._drain = loop, [], None
        self._spawn()

    def _spawn(self) -> None:
        try:
            helper = HelperProcess(_MODULE)
        except OSError as e:
            raise SigningUnavailable(f"cannot start the signing process: {e.strerror}") from None
        os.set_blocking(helper.from_child, False)
        assert self._loop is not None
        self._helper, self._answers = helper, AnswerReader(self._loop, helper.from_child)
        self._known.clear()

    def _stop(self) -> None:
        if self._answers is not None:
            self._answers.close()
            self._answers = None
        if self._helper is not None:
            self._helper.kill()
            self._helper = None

    def close(self) -> None:
        """Kill and reap the helper."""
        self._stop()
        self._loop = None


def main() -> None:
    """The helper: a private key per kid, a list of signatures per frame."""
    rfd, wfd = int(sys.argv[1]), int(sys.argv[2])  # (no core file: HelperProcess set RLIMIT_CORE to 0)
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
