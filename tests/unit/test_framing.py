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


# ------------------------------------------------------------------ bounded decoding

from molinkd.limits import CONTROL_MSG, GENERATE_MSG, RECORD_MSG, STAGE_MSG, MsgLimits  # noqa: E402
from p2p.framing import scan  # noqa: E402


def frame_payload(body) -> bytes:
    return msgpack.packb({"v": 1, "t": "x", "b": body}, use_bin_type=True)


@pytest.mark.parametrize("limits", [STAGE_MSG, GENERATE_MSG, CONTROL_MSG, RECORD_MSG], ids=lambda p: p.name)
def test_timestamp_ext_refused_by_every_profile(limits):
    # msgpack decodes ext -1 natively (never calling ext_hook): it must still be refused
    for ts in (msgpack.Timestamp(1, 0), msgpack.Timestamp(2**33, 5), msgpack.Timestamp(-(2**40), 1)):
        with pytest.raises(FrameError, match="extension type -1"):
            decode_payload(frame_payload({"when": ts}), limits)
    with pytest.raises(FrameError, match="extension type 7"):
        decode_payload(frame_payload([msgpack.ExtType(7, b"x" * 300)]), limits)


def test_default_decoder_refuses_timestamp_too():
    dec = FrameDecoder(1 << 20)  # the positional form molinkd.engine.link uses
    dec.feed(HEADER.pack(len(p := frame_payload(msgpack.Timestamp(1, 0)))) + p)
    with pytest.raises(FrameError, match="extension"):
        dec.next_frame()


LIM = MsgLimits(name="t", max_frame=1 << 20, max_bin_len=100, max_str_len=50, max_array_len=10, max_map_len=5,
                max_depth=4, max_elements=200)


@pytest.mark.parametrize("body,match", [
    (b"x" * 101, "binary of 101"),
    ("s" * 51, "string of 51"),
    (list(range(11)), "array of 11"),
    ({str(i): i for i in range(6)}, "map of 6"),
    ([[[[1]]]], "deeper than 4"),  # envelope map + 4 lists = 5 levels
    ([[[[]]]], "deeper than 4"),
    ([list(range(10))] * 10 + [list(range(10))] * 10, "array of 20"),
    ([[list(range(10))] * 10] * 3, "over 200 values"),
])
def test_each_bound_enforced(body, match):
    with pytest.raises(FrameError, match=match):
        decode_payload(frame_payload(body), LIM)


def test_within_bounds_decodes():
    body = {"a": b"x" * 100, "s": "s" * 50, "l": [1, 2, [3]], "m": {"k": None}}
    assert decode_payload(frame_payload(body), LIM).body == body


@pytest.mark.parametrize("payload,match", [
    (frame_payload([1, 2])[:-1], "truncated"),
    (frame_payload("abc") + b"\x00", "trailing"),
    (b"\xdd\xff\xff\xff\xff", "array of"),  # a length lie: 4 billion items announced in 5 bytes
    (b"\xc6\x7f\xff\xff\xff", "binary of"),
    (b"\xdf\x00\x10\x00\x00", "map of"),
    (b"\xc1", "reserved"),
    (b"", "truncated"),
])
def test_lies_and_truncations(payload, match):
    with pytest.raises(FrameError, match=match):
        decode_payload(payload, STAGE_MSG)


def test_no_orders_of_magnitude_expansion():
    """1 MiB of empty maps would cost ~80 MiB of dicts: refused before anything is built."""
    import tracemalloc

    bomb = msgpack.packb({"v": 1, "t": "x", "b": [[{}] * 15] * 65536})
    assert len(bomb) > 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="amplification"):
            decode_payload(bomb, STAGE_MSG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(bomb)
    # the honest worst case (token ids) passes and stays within the bound it claims
    toks = frame_payload({"prompt_token_ids": list(range(1000, 50_000))})
    tracemalloc.start()
    try:
        decode_payload(toks, STAGE_MSG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= STAGE_MSG.max_expansion * len(toks) + (64 << 10)


def test_scan_counts_values():
    assert scan(msgpack.packb({"a": [1, 2, "x"]}), STAGE_MSG) == 6  # map, key, list, 3 items


def test_decoder_max_size_narrows_the_profile():
    dec = FrameDecoder(1024, limits=GENERATE_MSG)
    assert dec.max_size == 1024 and dec.limits is GENERATE_MSG
    dec.feed(HEADER.pack(2048))
    with pytest.raises(FrameError, match="exceeds"):
        dec.next_frame()
    assert FrameDecoder(limits=CONTROL_MSG).max_size == CONTROL_MSG.max_frame


async def test_large_frames_decoded_off_the_loop_while_others_run():
    """A peer sending a large, slow-to-scan frame does not stall other tasks on the loop."""
    import p2p.streams as streams

    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a, peer="a"), FramedStream(b, peer="b", limits=STAGE_MSG)
    body = list(range(1000, 400_000))  # ~1.2 MB of token ids: ~60 ms of scanning
    ticks = []

    async def ticker():
        while True:
            ticks.append(trio.current_time())
            await trio.sleep(0.002)

    async with trio.open_nursery() as n:
        n.start_soon(ticker)
        n.start_soon(fa.send, "big", body)
        t0 = trio.current_time()
        f = await fb.recv(timeout=30)
        t1 = trio.current_time()
        n.cancel_scope.cancel()
    assert f.body == body
    gaps = [y - x for x, y in zip(ticks, ticks[1:]) if t0 <= x <= t1]
    assert len(gaps) >= 3, "the loop did not run while the frame was decoded"
    assert len(encode_frame("big", body)) > streams.OFFLOAD_BYTES
    # small frames decode inline and a stream's profile can be tightened between frames
    fb.limits = CONTROL_MSG
    await fa.send("small", {"ok": 1})
    assert (await fb.recv(timeout=5)).body == {"ok": 1}
    await fa.send("big", list(range(2000)))
    with pytest.raises(FrameError, match="array of 2000"):
        await fb.recv(timeout=5)
