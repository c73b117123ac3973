"""Readiness rule, request accounting and event log lines of molinkd.metrics (no sockets)."""

import logging
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from molinkd import metrics as m
from molinkd.protocol import APIError


def _samples(reg: m.Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(reg.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_readiness_reasons():
    base = dict(engine_error=None, route_error=None, gaps=(), peers_known=2)
    assert m.readiness(role="full", engine_state="ready", serving=True, **base) == (True, "ready")
    assert m.readiness(role="full", engine_state="loading", serving=False, **base) == (False, "engine loading")
    ok, why = m.readiness(role="head", engine_state="waiting for route", serving=False,
                          **dict(base, route_error="no live peer ...", gaps=((15, 30),)))
    assert not ok and why == "no route: layers 15:30 uncovered"
    ok, why = m.readiness(role="head", engine_state="waiting for route", serving=False,
                          **dict(base, route_error="no span starts at 12"))
    assert why == "no route: no span starts at 12"  # covered, but misaligned spans
    assert m.readiness(role="gateway", engine_state="none", serving=False, **dict(base, gaps=((0, 10), (20, 30))))[1] \
        == "no route: layers 0:10, 20:30 uncovered"
    assert "no peers" in m.readiness(role="gateway", engine_state="none", serving=False,
                                     **dict(base, peers_known=0))[1]
    assert "no head ready" in m.readiness(role="stage", engine_state="ready", serving=False, **base)[1]
    assert m.readiness(role="full", engine_state="restarting", serving=False,
                       **dict(base, engine_error="boom"))[1] == "engine restarting: boom"
    # a loading full node that can forward to another head serves already
    assert m.readiness(role="full", engine_state="loading", serving=True, **base)[0]


async def _drain(agen):
    out = []
    async for ev in agen:
        out.append(ev)
    return out


async def test_track_counts_tokens_latencies_and_outcomes():
    reg = m.Metrics()

    async def events():
        yield {"ev": "start", "prompt_tokens": 5, "n": 1}
        for _ in range(3):
            await trio.sleep(0.01)
            yield {"ev": "delta", "index": 0, "token_ids": [1, 2], "text": "ab", "finish_reason": None}
        yield {"ev": "end", "prompt_tokens": 5, "completion_tokens": 6}

    await _drain(reg.track("/v1/completions", "r1", events(), time.monotonic() - 0.5, stream=True))
    s = _samples(reg)
    assert s[("molink_requests_total", (("endpoint", "/v1/completions"), ("outcome", "ok")))] == 1
    assert s[("molink_prompt_tokens_total", ())] == 5 and s[("molink_generation_tokens_total", ())] == 6
    assert s[("molink_time_to_first_token_seconds_count", ())] == 1
    assert s[("molink_time_to_first_token_seconds_sum", ())] >= 0.5
    assert s[("molink_inter_token_latency_seconds_count", ())] == 4  # 2 later deltas x 2 tokens
    # a non-streamed request: tokens counted, no TTFT/ITL
    await _drain(reg.track("/generate", "r2", events(), time.monotonic(), stream=False))
    s = _samples(reg)
    assert s[("molink_generation_tokens_total", ())] == 12 and s[("molink_time_to_first_token_seconds_count", ())] == 1


async def test_track_failures_and_cancellations(caplog):
    reg = m.Metrics()
    reg.peer_id = "12D3KooWme"

    async def failing():
        yield {"ev": "start", "prompt_tokens": 1, "n": 1}
        raise APIError(502, "the head 12D3KooWhead failed mid-request", retryable=True)

    with caplog.at_level(logging.INFO, logger="molinkd.events"):
        with pytest.raises(APIError):
            await _drain(reg.track("/generate", "rid-1", failing(), time.monotonic(), stream=False))
    lines = [r for r in caplog.records if r.name == "molinkd.events"]
    assert len(lines) == 1 and lines[0].getMessage() == "request failed"
    assert lines[0].kv["me"] == "12D3KooWme" and lines[0].kv["request_id"] == "rid-1" and lines[0].kv["status"] == 502

    async def slow():
        yield {"ev": "start", "prompt_tokens": 1, "n": 1}
        await trio.sleep_forever()
        yield {}

    with trio.move_on_after(0.05):
        await _drain(reg.track("/generate", "rid-2", slow(), time.monotonic(), stream=True))
    agen = reg.track("/generate", "rid-3", slow(), time.monotonic(), stream=True)
    await agen.__anext__()
    await agen.aclose()  # the client went away
    s = _samples(reg)
    assert s[("molink_requests_total", (("endpoint", "/generate"), ("outcome", "error")))] == 1
    assert s[("molink_requests_total", (("endpoint", "/generate"), ("outcome", "cancelled")))] == 2
    assert reg.summary()["requests"]["/generate"] == {"error": 1, "cancelled": 2}


def test_event_lines_one_each(caplog):
    reg = m.Metrics()
    reg.peer_id = "me"
    with caplog.at_level(logging.INFO, logger="molinkd.events"):
        reg.peer_joined("A", (0, 15), "head")
        reg.peer_left("A", "expired")
        reg.route_chosen([{"peer": "H", "start": 0, "end": 15}, {"peer": "S", "start": 15, "end": 30}], None)
        reg.route_chosen([{"peer": "H", "start": 0, "end": 15}, {"peer": "T", "start": 15, "end": 30}],
                         [{"peer": "H", "start": 0, "end": 15}, {"peer": "S", "start": 15, "end": 30}])
        reg.banned("S", 30.0, "sent garbage")
        reg.request_resumed("/generate", "r", "stage died", 7, 1)
        reg.request_done("/generate", 400)  # the client's fault: counted, not logged
    msgs = [(r.getMessage(), r.kv) for r in caplog.records if r.name == "molinkd.events"]
    assert [x[0] for x in msgs] == ["peer joined", "peer left", "route chosen", "route changed",
                                    "peer banned from routes", "request resumed on another backend"]
    assert msgs[0][1]["peer"] == "A" and msgs[3][1]["route"] == "H[0:15) -> T[15:30)" and "S[15:30)" in msgs[3][1]["previous"]
    assert all(kv["me"] == "me" for _, kv in msgs)
    s = reg.summary()
    assert s["bans"] == 1 and s["resumed_requests"] == 1 and s["requests"]["/generate"] == {"rejected": 1}


def test_registries_are_per_instance():
    a, b = m.Metrics(), m.Metrics()
    a.bans.inc()
    assert a.summary()["bans"] == 1 and b.summary()["bans"] == 0


def test_tcp_byte_counters_of_a_real_loopback_connection():
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    x = socket.create_connection(srv.getsockname(), timeout=10)
    y, _ = srv.accept()
    try:
        x.sendall(b"a" * 1000)
        got = b""
        while len(got) < 1000:
            got += y.recv(4096)
        y.sendall(b"b" * 10)
        assert len(x.recv(100)) == 10
        # bytes acknowledged by the other side (the connecting side's SYN counts as one), bytes received
        (xs, xr), (ys, yr) = m._tcp_bytes(x), m._tcp_bytes(y)
        assert xs in (1000, 1001) and xr == 10 and ys in (10, 11) and yr == 1000
    finally:
        for s in (x, y, srv):
            s.close()


def test_peer_bytes_stay_monotonic_when_connections_close():
    """PeerBytes over real loopback TCP sockets, held in the shape of py-libp2p's connection table."""
    import socket
    from types import SimpleNamespace

    class PeerId(str):
        def to_base58(self) -> str:
            return str(self)

    srv = socket.create_server(("127.0.0.1", 0))
    pairs = []
    for _ in range(2):
        x = socket.create_connection(srv.getsockname(), timeout=10)
        y, _ = srv.accept()
        pairs.append((x, y))
    conns: dict = {PeerId("A"): [SimpleNamespace(muxed_conn=SimpleNamespace(secured_conn=SimpleNamespace(
        stream=SimpleNamespace(socket=x)))) for x, _ in pairs]}
    host = SimpleNamespace(get_network=lambda: SimpleNamespace(connections=conns))

    def send(i: int, n: int) -> None:
        x, y = pairs[i]
        x.sendall(b"z" * n)
        got = 0
        while got < n:
            got += len(y.recv(65536))

    pb = m.PeerBytes()
    try:
        send(0, 500)
        send(1, 700)
        totals, relayed = pb.sample(host)
        assert 1200 <= totals["A"][0] <= 1202 and relayed == set()
        conns[PeerId("A")].pop(0)  # the first connection closes: its bytes stay counted
        pairs[0][0].close()
        send(1, 100)
        totals, _ = pb.sample(host)
        assert 1300 <= totals["A"][0] <= 1302
        conns[PeerId("B")] = [SimpleNamespace(muxed_conn=SimpleNamespace())]  # no socket: a relayed peer
        assert pb.sample(host)[1] == {"B"}
    finally:
        for x, y in pairs:
            x.close()
            y.close()
        srv.close()
