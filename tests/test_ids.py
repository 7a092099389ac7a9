"""jtis are RFC 9562 version-4 UUIDs, unique, also across a fork."""

from __future__ import annotations

import os
import uuid

from ssa_server.ssa import new_jti


def test_jtis_are_version_4_uuids_and_unique():
    jtis = [new_jti() for _ in range(5000)]
    assert len(set(jtis)) == len(jtis)
    for jti in jtis[:600]:
        parsed = uuid.UUID(jti)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == jti


def test_a_forked_child_does_not_repeat_the_parents_jtis():
    new_jti()  # (a buffered random source would hold unused bytes now)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_jti().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    assert child != new_jti()
