import pytest

from molinkd.routing import NoRouteError, PeerRecord, plan_route, route_to_dicts

H = "hash-a"


def rec(pid, s, e, tp=50.0, load=0.0, rtt=0.01, h=H):
    return PeerRecord(pid, s, e, tp, load, rtt, h)


HEAD = rec("head", 0, 15)


def test_single_node_head():
    r = plan_route(rec("solo", 0, 30), [], 30)
    assert r.peer_ids == ["solo"]


def test_simple_two_stage():
    r = plan_route(HEAD, [rec("b", 15, 30)], 30)
    assert r.peer_ids == ["head", "b"]
    assert r.spans() == [(0, 15), (15, 30)]
    assert r.cost == pytest.approx(1 / 50 + 0.005 + 1 / 50)


def test_prefers_fast_low_latency_low_load():
    peers = [rec("slow", 15, 30, tp=10.0), rec("fast", 15, 30, tp=100.0), rec("far", 15, 30, tp=100.0, rtt=0.5)]
    assert plan_route(HEAD, peers, 30).peer_ids == ["head", "fast"]
    loaded = [rec("fast", 15, 30, tp=100.0, load=20.0), rec("ok", 15, 30, tp=60.0)]
    assert plan_route(HEAD, loaded, 30).peer_ids == ["head", "ok"]


def test_multi_hop_vs_single_hop():
    peers = [rec("x", 15, 22, tp=200.0), rec("y", 22, 30, tp=200.0), rec("z", 15, 30, tp=20.0)]
    # two fast hops (0.005+0.005+0.01+0.005... ) beat one slow hop (0.05)
    assert plan_route(HEAD, peers, 30).peer_ids == ["head", "x", "y"]
    # with high RTT the single hop wins
    slow_net = {"x": 1.0, "y": 1.0, "z": 0.01}
    assert plan_route(HEAD, peers, 30, rtts=slow_net).peer_ids == ["head", "z"]


def test_never_mixes_model_hash_and_skips_banned():
    peers = [rec("other", 15, 30, tp=1000.0, h="hash-b"), rec("b", 15, 30), rec("c", 15, 30, tp=40.0)]
    assert plan_route(HEAD, peers, 30).peer_ids == ["head", "b"]
    assert plan_route(HEAD, peers, 30, banned={"b"}).peer_ids == ["head", "c"]
    with pytest.raises(NoRouteError, match="layer 15"):
        plan_route(HEAD, peers, 30, banned={"b", "c"})


def test_chain_must_start_at_span_start_exactly():
    # a peer covering 10:30 cannot be entered at 15 (stages run exactly their span)
    with pytest.raises(NoRouteError):
        plan_route(HEAD, [rec("b", 10, 30)], 30)


def test_gap_reported():
    with pytest.raises(NoRouteError, match="layer 20"):
        plan_route(HEAD, [rec("b", 15, 20), rec("c", 22, 30)], 30)


def test_head_must_own_layer_zero():
    with pytest.raises(ValueError):
        plan_route(rec("h", 5, 15), [], 30)


def test_route_dicts():
    r = plan_route(HEAD, [rec("b", 15, 30)], 30)
    assert route_to_dicts(r, {"b": "tcp:127.0.0.1:1"}) == [
        {"peer": "head", "start": 0, "end": 15, "addr": ""},
        {"peer": "b", "start": 15, "end": 30, "addr": "tcp:127.0.0.1:1"},
    ]
