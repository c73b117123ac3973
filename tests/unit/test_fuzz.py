"""Fuzz every decoder a peer can reach: they may only raise their own error class.

Structured cases come from hypothesis (derandomized: CI runs the same cases every time);
volume comes from seeded mutations of valid messages (tests/fuzzing.py) and byte-level damage of
valid frames (bit flips, truncations, lying length fields). Tens of thousands of inputs in total,
~30 s. Memory: byte-mutated frames are decoded under tracemalloc and must stay within the
profile's expansion bound. Hangs: every test has a pytest timeout.
"""

from __future__ import annotations

import random
import tracemalloc

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molinkd import forward
from molinkd.engine import schedwire, wire
from molinkd.limits import CONTROL_MSG, EXPANSION_SLACK, GENERATE_MSG, GENERATE_REPLY_MSG, RECORD_MSG, STAGE_MSG
from molinkd.protocol import APIError, GenerationRequest
from p2p.framing import HEADER, FrameDecoder, FrameError, decode_payload, encode_frame
from p2p.records import PeerRecord, RecordError, decode_record, encode_record
from p2p.tensors import from_wire, to_wire
from tests.fuzzing import mutate, mutate_bytes, mutate_step_bodies
from tests.unit.test_schedcheck import LIM, decode, mro, prefill

PROFILES = [STAGE_MSG, GENERATE_MSG, GENERATE_REPLY_MSG, CONTROL_MSG, RECORD_MSG]
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

pytestmark = pytest.mark.timeout(240)

leaves = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=24) | st.binary(max_size=24)
    | st.sampled_from([msgpack.Timestamp(1, 0), msgpack.ExtType(3, b"x")])
)
values = st.recursive(leaves, lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=8), c, max_size=6),
                      max_leaves=40)


def packb(v) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


# ------------------------------------------------------------------ valid seeds


def step_body(so) -> dict:
    h = None
    if so.total_num_scheduled_tokens:
        h = {n: to_wire(torch.zeros(so.total_num_scheduled_tokens, LIM.hidden_size, dtype=torch.bfloat16))
             for n in LIM.hidden_names}
    return {"step": 3, "sched": schedwire.encode_scheduler_output(so), "grammar": None, "hidden": h,
            "sample": True, "timings": [["S1", 1.0]]}


def gen_request() -> dict:
    return {"req": GenerationRequest(kind="completion", prompt="hello", sampling={"temperature": 0.5, "n": 2,
                                                                                  "logprobs": 3},
                                     max_tokens=8).to_wire(), "model_hash": "ab" * 32}


def record_bytes() -> bytes:
    return encode_record(PeerRecord("P1", ("/ip4/10.0.0.1/tcp/1",), "m", "ab" * 32, 0, 10, 30, time=1e9,
                                    extras={"engine": "ready", "rtt": {"P2": 1.5}, "route": ["a", "b"]}))


VALID_FRAMES = [
    encode_frame(wire.STEP, step_body(prefill())),
    encode_frame(wire.STEP, step_body(decode())),
    encode_frame(forward.REQUEST, gen_request()),
    encode_frame(forward.EVENT, {"ev": "delta", "index": 0, "text": "hi", "token_ids": [5],
                                 "logprobs": [[[5, -0.1, 1, "hi"]]], "finish_reason": None}),
    encode_frame("p2p.dial", {"peer": "Qm" + "x" * 44, "proto": "/molink/stage/1"}),
]


def expect(errors, fn, *args):
    try:
        fn(*args)
    except errors:
        pass


# ------------------------------------------------------------------ frames


@FUZZ
@given(body=values, profile=st.sampled_from(PROFILES))
def test_decode_payload_structured(body, profile):
    try:
        data, raw = packb({"v": 1, "t": "x", "b": body}), packb(body)
    except (OverflowError, TypeError, ValueError):
        return
    expect(FrameError, decode_payload, data, profile)
    expect(FrameError, decode_payload, raw, profile)


@FUZZ
@given(data=st.binary(max_size=300), profile=st.sampled_from(PROFILES))
def test_decode_payload_random_bytes(data, profile):
    expect(FrameError, decode_payload, data, profile)


def test_byte_mutations_of_valid_frames():
    """~12k damaged frames through FrameDecoder; 600 of them under tracemalloc."""
    rng = random.Random(8)
    n = 0
    for frame in VALID_FRAMES:
        for profile in PROFILES:
            for i in range(600):
                data = mutate_bytes(frame, rng, framed=True)
                dec = FrameDecoder(limits=profile)
                traced = i < 30
                if traced:
                    tracemalloc.start()
                try:
                    dec.feed(data)
                    while dec.next_frame() is not None:
                        pass
                except FrameError:
                    pass
                finally:
                    if traced:
                        _, peak = tracemalloc.get_traced_memory()
                        tracemalloc.stop()
                        assert peak <= 2 * len(data) + profile.max_expansion * len(data) + EXPANSION_SLACK + (256 << 10)
                n += 1
    assert n >= 12_000


# ------------------------------------------------------------------ records


@FUZZ
@given(extras=values, field=st.sampled_from(["time", "addrs", "extras", "span_end", "peer_id", "v", "state"]),
       value=values)
def test_decode_record_structured(extras, field, value):
    w = msgpack.unpackb(record_bytes())
    w["extras"] = extras if isinstance(extras, dict) else {"x": extras}
    try:
        expect(RecordError, decode_record, packb(w))
        w[field] = value
        expect(RecordError, decode_record, packb(w))
    except (OverflowError, TypeError, ValueError) as e:  # packb refusing the input, not the decoder
        assert not isinstance(e, RecordError)
        return


def test_record_mutations_and_json_safety():
    import json

    rng = random.Random(9)
    base = msgpack.unpackb(record_bytes())
    good = 0
    for i in range(4000):
        data = mutate_bytes(record_bytes(), rng) if i % 2 else packb(mutate(base, rng))
        try:
            rec = decode_record(data)
        except RecordError:
            continue
        good += 1
        json.dumps(rec.to_dict(), allow_nan=False)  # /status cannot be broken by an accepted record
    assert good > 100


# ------------------------------------------------------------------ scheduler / model runner outputs


def _decode_and_check_step(body) -> None:
    b = wire.check_step_body(body, max_timings=3)
    so = schedwire.decode_scheduler_output(b["sched"])
    schedwire.check_scheduler_output(so, LIM)
    hidden = b.get("hidden")
    if hidden:
        hidden = {k: from_wire(v) for k, v in hidden.items()}
    schedwire.check_hidden_states(hidden, so, LIM)
    schedwire.decode_grammar_output(b.get("grammar"))


def test_step_body_mutations():
    """~16k mutated step bodies through the stage's decode + check path (through real frames)."""
    n = 0
    for seed, so in enumerate((prefill(), decode())):
        body = step_body(so)
        for mutated in mutate_step_bodies(body, 8000, seed):
            try:
                data = encode_frame(wire.STEP, mutated)
            except (FrameError, OverflowError, TypeError, ValueError):
                continue
            try:
                f = decode_payload(data[HEADER.size:], STAGE_MSG)
                _decode_and_check_step(f.body)
            except FrameError:
                pass
            n += 1
    assert n > 10_000


@FUZZ
@given(sched=values)
def test_decode_scheduler_output_structured(sched):
    so_dict = schedwire.encode_scheduler_output(decode())
    if isinstance(sched, dict):
        so_dict.update(sched)
    expect(FrameError, lambda: schedwire.check_scheduler_output(schedwire.decode_scheduler_output(so_dict), LIM))
    expect(FrameError, lambda: schedwire.decode_scheduler_output(sched))


def test_model_runner_output_mutations():
    from vllm.v1.outputs import LogprobsLists
    import numpy as np

    rng = random.Random(11)
    so = decode()
    base = schedwire.encode_model_runner_output(mro(logprobs=LogprobsLists(
        np.ones((2, 3), np.int64), np.zeros((2, 3), np.float32), np.zeros(2, np.int64))))
    accepted = 0
    for _ in range(6000):
        m = mutate(base, rng)
        try:
            out = schedwire.decode_model_runner_output(m)
            schedwire.check_model_runner_output(out, so, LIM)
            accepted += 1
        except FrameError:
            pass
    assert accepted < 6000  # the mutations do get refused (and nothing else escapes)


@FUZZ
@given(d=values)
def test_decode_model_runner_output_structured(d):
    base = schedwire.encode_model_runner_output(mro())
    if isinstance(d, dict):
        base.update(d)
    expect(FrameError, lambda: schedwire.check_model_runner_output(schedwire.decode_model_runner_output(base),
                                                                   decode(), LIM))


# ------------------------------------------------------------------ generate protocol, session bodies


@FUZZ
@given(ev=values, kind=st.sampled_from(["start", "delta", "end"]))
def test_check_event(ev, kind):
    expect(FrameError, forward.check_event, ev)
    if isinstance(ev, dict):
        expect(FrameError, forward.check_event, {**ev, "ev": kind})


def test_event_and_request_mutations():
    rng = random.Random(12)
    events = [{"ev": "start", "prompt": "p", "prompt_tokens": 1, "n": 1, "prompt_token_ids": [1]},
              {"ev": "delta", "index": 0, "text": "t", "token_ids": [5], "logprobs": [[[5, -0.1, 1, "t"]]],
               "finish_reason": None},
              {"ev": "end", "prompt_tokens": 1, "completion_tokens": 2}]
    req = gen_request()["req"]
    for _ in range(3000):
        expect(FrameError, forward.check_event, mutate(rng.choice(events), rng))
        expect(APIError, GenerationRequest.from_wire, mutate(req, rng))


@FUZZ
@given(d=values)
def test_generation_request_from_wire(d):
    expect(APIError, GenerationRequest.from_wire, d)
    base = gen_request()["req"]
    if isinstance(d, dict):
        expect(APIError, GenerationRequest.from_wire, {**base, **{k: v for k, v in d.items() if k in base}})
        expect(APIError, GenerationRequest.from_wire, {**base, "sampling": d})


def session_body() -> dict:
    route = [{"peer": "H", "addr": "", "start": 0, "end": 10}, {"peer": "S1", "addr": "p2p:S1", "start": 10, "end": 30}]
    return wire.session_body(session="s", model_hash="ab" * 32, route=route, num_layers=30, dtype="bfloat16",
                             max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=512, block_size=16)


def test_session_body_mutations():
    rng = random.Random(13)
    base = session_body()
    ok = {"session": "s", "stages": [{"index": 1, "start": 10, "end": 30, "max_blocks": 5, "peer": "S1"}]}
    for _ in range(3000):
        expect(FrameError, wire.check_session_body, mutate(base, rng))
        expect(FrameError, wire.check_hello_ok, mutate(ok, rng), base["route"])
        expect(FrameError, wire.check_open_ok, mutate({"session": "s", "num_blocks": 4}, rng))
        expect(FrameError, wire.check_timings, mutate([["S1", 1.0]], rng))


@FUZZ
@given(d=values)
def test_session_body_structured(d):
    expect(FrameError, wire.check_session_body, d)
    if isinstance(d, dict):
        expect(FrameError, wire.check_session_body, {**session_body(), **d})
        expect(FrameError, wire.check_hello_ok, d, session_body()["route"])


@FUZZ
@given(d=values)
def test_tensor_from_wire(d):
    expect(FrameError, from_wire, d)
    if isinstance(d, dict):
        expect(FrameError, from_wire, {**to_wire(torch.zeros(2, 3)), **d})


def test_mutation_helpers_are_reproducible_and_mutate():
    from tests.fuzzing import mutate_frames

    body = step_body(decode())
    a = list(mutate_step_bodies(body, 50, seed=5))
    assert a == list(mutate_step_bodies(body, 50, seed=5))
    assert a != list(mutate_step_bodies(body, 50, seed=6))
    assert sum(m != body for m in a) >= 45
    frame = VALID_FRAMES[1]
    fa = list(mutate_frames(frame, 50, seed=1))
    assert fa == list(mutate_frames(frame, 50, seed=1)) and sum(f != frame for f in fa) >= 45
