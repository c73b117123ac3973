import struct

import msgpack
import pytest
import torch
import trio
import trio.testing

from p2p.framing import HEADER, FrameDecoder, FrameError, decode_payload, encode_frame, require
from p2p.streams import FramedStream, StreamClosed
from p2p.tensors import from_wire, to_wire


def test_round_trip_and_split_feeding():
    data = encode_frame("step", {"id": 7, "x": b"\x00" * 1000}) + encode_frame("ping", None)
    dec = FrameDecoder()
    frames = []
    for i in range(0, len(data), 7):  # byte dribbles, as py-libp2p's short reads give
        dec.feed(data[i:i + 7])
        while (f := dec.next_frame()) is not None:
            frames.append(f)
    assert [f.type for f in frames] == ["step", "ping"]
    assert frames[0].body == {"id": 7, "x": b"\x00" * 1000}
    assert dec.at_boundary()


def test_oversized_frame_refused_before_buffering():
    dec = FrameDecoder(max_size=1024)
    dec.feed(HEADER.pack(10_000_000))
    with pytest.raises(FrameError, match="exceeds"):
        dec.next_frame()
    with pytest.raises(FrameError, match="limit"):
        encode_frame("x", b"a" * 2048, max_size=1024)


@pytest.mark.parametrize("payload,msg", [
    (b"\xc1", "reserved"),
    (msgpack.packb([1, 2]), "map"),
    (msgpack.packb({"v": 99, "t": "x"}), "unsupported frame version"),
    (msgpack.packb({"v": 1, "t": 5}), "type a string"),
    (msgpack.packb({"v": 1, "t": "x", "b": msgpack.ExtType(1, b"evil")}), "extension"),
])
def test_malformed_payloads(payload, msg):
    with pytest.raises(FrameError, match=msg):
        decode_payload(payload)


def test_empty_frame_and_truncated():
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", 0))
    with pytest.raises(FrameError, match="empty"):
        dec.next_frame()


def test_require():
    assert require({"a": 1}, "a", int) == 1
    with pytest.raises(FrameError, match="missing"):
        require({}, "a", int)
    with pytest.raises(FrameError, match="bool"):
        require({"a": True}, "a", int)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.int64])
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    back = from_wire(to_wire(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_tensor_validation():
    good = to_wire(torch.zeros(2, 2))
    with pytest.raises(FrameError, match="needs 16 bytes"):
        from_wire({**good, "data": good["data"][:-1]})
    with pytest.raises(FrameError, match="not allowed"):
        from_wire({**good, "dtype": "object"})
    with pytest.raises(FrameError, match="shape"):
        from_wire({**good, "shape": [-1, 2]})


async def test_framed_stream_over_memory_pair():
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a, peer="a"), FramedStream(b, peer="b")
    await fa.send("hello", {"n": 1})
    f = await fb.recv(timeout=5)
    assert f.type == "hello" and f.body == {"n": 1}
    await a.send_all(encode_frame("x", 1)[:5])  # a truncated frame then EOF
    await a.aclose()
    with pytest.raises(FrameError, match="inside a frame"):
        await fb.recv(timeout=5)


async def test_framed_stream_clean_close_and_deadline():
    a, b = trio.testing.memory_stream_pair()
    fb = FramedStream(b, peer="b")
    with pytest.raises(trio.TooSlowError):
        await fb.recv(timeout=0.05)
    await a.aclose()
    with pytest.raises(StreamClosed):
        await fb.recv(timeout=5)


def test_take_unparsed_returns_exact_bytes():
    a, b = encode_frame("a", 1), encode_frame("b", b"x" * 100)
    dec = FrameDecoder()
    dec.feed(a + b[:10])
    assert dec.next_frame().type == "a"
    assert dec.next_frame() is None  # header of b consumed, payload partial
    assert dec.take_unparsed() == b[:10]
    assert dec.at_boundary()
