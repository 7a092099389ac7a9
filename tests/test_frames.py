"""Frames over pipes: reads may split one frame or hold several."""

from __future__ import annotations

import os

import pytest

from ssa_server.frames import FrameBuffer, LoneSurrogate, dumps, loads, read_ready, write_frame


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


def test_the_server_refuses_a_lone_surrogate_in_an_answer_on_either_json_path():
    """A worker's answer is parsed by orjson, or by the stdlib behind the leading-space marker
    (integers beyond 64 bits): neither hands the server a string with a lone surrogate."""
    assert loads(b' {"n": 1208925819614629174706176, "x": "\\ud83d\\ude00"}')["x"] == "\U0001F600"
    with pytest.raises(LoneSurrogate):
        loads(b' {"n": 1208925819614629174706176, "x": "a\\ud800"}')
    with pytest.raises(LoneSurrogate):
        loads(b' {"\\udfff": 1}')
    with pytest.raises(ValueError):
        loads(b'{"x": "\\ud800"}')
