"""Frames over pipes: reads may split one frame or hold several."""

from __future__ import annotations

import os

from ssa_server.plugins.sandbox.protocol import FrameBuffer, dumps, read_ready, write_frame


def framed(value) -> bytes:
    text = dumps(value)
    return len(text).to_bytes(4, "big") + text


def test_a_frame_split_across_reads_and_two_in_one_read():
    buffer = FrameBuffer()
    data = framed({"a": "x" * 1000}) + framed([1])
    buffer.feed(data[:2])
    assert buffer.next_size() is None and buffer.pop() is None
    buffer.feed(data[2:500])
    assert buffer.next_size() == len(dumps({"a": "x" * 1000})) and buffer.pop() is None
    buffer.feed(data[500:])  # the rest of the first frame and all of the second
    assert buffer.pop() == dumps({"a": "x" * 1000})
    assert buffer.pop() == b"[1]"
    assert buffer.pop() is None and buffer.next_size() is None


def test_read_ready_nothing_yet_data_then_closed():
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        assert read_ready(r) is None
        write_frame(w, [1])
        assert read_ready(r) == framed([1])
        os.close(w)
        assert read_ready(r) == b""
    finally:
        os.close(r)
