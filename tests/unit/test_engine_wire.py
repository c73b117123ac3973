"""Engine-session frame bodies (molinkd.engine.wire): honest bodies pass, hostile ones are refused."""

from __future__ import annotations

import copy

import pytest

from molinkd.engine import wire
from p2p.framing import FrameError

ROUTE = [
    {"peer": "H", "addr": "", "start": 0, "end": 10},
    {"peer": "S1", "addr": "p2p:S1", "start": 10, "end": 20},
    {"peer": "S2", "addr": "p2p:S2", "start": 20, "end": 30},
]


def body(**kw) -> dict:
    b = wire.session_body(session="sess-1", model_hash="ab" * 32, route=copy.deepcopy(ROUTE), num_layers=30,
                          dtype="bfloat16", max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=2048,
                          block_size=16)
    b.update(kw)
    return b


def stage_entry(i: int, **kw) -> dict:
    e = {"index": i, "start": ROUTE[i]["start"], "end": ROUTE[i]["end"], "max_blocks": 500, "peer": ROUTE[i]["peer"]}
    e.update(kw)
    return e


def test_honest_session_bodies_pass():
    wire.check_session_body(body())
    wire.check_session_body(body(stage=2, stages=[stage_entry(1)]))


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="int8"), "dtype"),
    (dict(session="x" * 1000), "longer"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(num_blocks=-1), "num_blocks"),
    (dict(stage=3), "stage index"),
    (dict(stage=1, stages=[stage_entry(1)]), "stage descriptions"),
    (dict(stage=2, stages=[stage_entry(1, index=5)]), "says it is stage 5"),
    (dict(stage=2, stages=[stage_entry(1, max_blocks=0)]), "max_blocks"),
    (dict(stage=2, stages=["junk"]), "must be a map"),
    (dict(route=[dict(ROUTE[0], addr="x" * 600), *ROUTE[1:]]), "addr"),
    (dict(route=[ROUTE[0]] * 65), "2..64"),
])
def test_hostile_session_bodies_refused(kw, match):
    with pytest.raises(FrameError, match=match):
        wire.check_session_body(body(**kw))


def test_timings_bounded_to_the_route():
    step = {"step": 1, "sched": {}, "sample": True, "hidden": None, "timings": [["S1", 1.5], ["S2", 2]]}
    wire.check_step_body(step, max_timings=3)
    with pytest.raises(FrameError, match="at most 1"):
        wire.check_step_body(step, max_timings=1)
    for bad in ([["S1"]], [["S1", "fast"]], [[5, 1.0]], [["S1", float("nan")]], [["S1", -1.0]], [["S1", True]],
                [["x" * 300, 1.0]], "timings"):
        with pytest.raises(FrameError, match="timings"):
            wire.check_step_body({**step, "timings": bad}, max_timings=3)


def test_hello_ok_checked_against_the_route():
    ok = {"session": "sess-1", "stages": [stage_entry(1), stage_entry(2)]}
    wire.check_hello_ok(ok, ROUTE, session="sess-1")
    for bad, match in [
        ({**ok, "session": "other"}, "not ours"),
        ({**ok, "stages": [stage_entry(1)]}, "describes 1 stages"),
        ({**ok, "stages": [stage_entry(2), stage_entry(1)]}, "says it is stage 2"),
        ({**ok, "stages": [stage_entry(1), stage_entry(2, peer="EVIL")]}, "route names 'S2'"),
        ({**ok, "stages": [stage_entry(1), stage_entry(2, start=19)]}, "serves 19:30"),
        ({**ok, "stages": [stage_entry(1), stage_entry(2, max_blocks=True)]}, "bool"),
        ({**ok, "stages": [stage_entry(1), stage_entry(2, max_blocks=1 << 40)]}, "max_blocks"),
        ({"stages": ok["stages"]}, "session"),
        ([1], "map"),
    ]:
        with pytest.raises(FrameError, match=match):
            wire.check_hello_ok(bad, ROUTE, session="sess-1")
    # engine-only setups without peer ids may skip the peer comparison
    wire.check_hello_ok({**ok, "stages": [stage_entry(1, peer=""), stage_entry(2, peer="")]}, ROUTE, peers=False)


def test_open_ok_checked():
    wire.check_open_ok({"session": "s", "num_blocks": 40}, session="s", num_blocks=40)
    for bad, match in [
        ({"session": "s", "num_blocks": 0}, "num_blocks"),
        ({"session": "s", "num_blocks": "40"}, "num_blocks"),
        ({"session": "s", "num_blocks": 39}, "40 were asked"),
        ({"session": "t", "num_blocks": 40}, "not ours"),
        (None, "map"),
    ]:
        with pytest.raises(FrameError, match=match):
            wire.check_open_ok(bad, session="s", num_blocks=40)


def test_recv_within_skips_other_frames_returns_errors_and_times_out():
    import socket

    from molinkd.engine.link import FramedLink, LinkTimeout, recv_within

    a, b = socket.socketpair()
    la, lb = FramedLink(a, peer="a"), FramedLink(b, peer="b")
    try:
        la.send(wire.RESULT, {"step": 1}, timeout=5)
        la.send(wire.RESULT, {"step": 2}, timeout=5)
        f = recv_within(lb, 5, lambda f: f.type == wire.RESULT and f.get("step") == 2, error_type=wire.ERROR)
        assert f.get("step") == 2
        la.send(wire.ERROR, {"stage": 1, "message": "no"}, timeout=5)
        la.send(wire.RESULT, {"step": 3}, timeout=5)
        f = recv_within(lb, 5, lambda f: f.type == wire.RESULT, error_type=wire.ERROR)
        assert f.type == wire.ERROR  # an error comes first: the caller sees it
        with pytest.raises(LinkTimeout):
            recv_within(lb, 0.2, lambda f: f.get("step") == 99, error_type=wire.ERROR)  # step 3 is skipped
    finally:
        la.close()
        lb.close()
