"""Peer records, the expiring table and layer coverage: pure, no sockets, no clock."""

from __future__ import annotations

import math

import msgpack
import pytest

from p2p.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    PeerTable,
    RecordError,
    coverage,
    decode_record,
    encode_record,
)

H = "ab" * 32


def rec(pid: str = "P1", s: int = 0, e: int = 10, t: float = 100.0, state: str = "online", **kw: object) -> PeerRecord:
    base: dict[str, object] = dict(
        peer_id=pid,
        addrs=["/ip4/127.0.0.1/tcp/1"],
        model_name="m",
        model_hash=H,
        span_start=s,
        span_end=e,
        total_layers=30,
        free_kv_blocks=5,
        throughput=12.5,
        active_requests=1,
        version="0.1.0",
        time=t,
        state=state,
    )
    base.update(kw)
    return PeerRecord(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- codec


def test_round_trip_keeps_every_field() -> None:
    r = rec(extras={"http": "127.0.0.1:8000", "rtt": {"P2": 1.5}, "head_of": None})
    back = decode_record(encode_record(r))
    assert back == r
    assert back.addrs == ("/ip4/127.0.0.1/tcp/1",)
    assert back.extras["rtt"] == {"P2": 1.5}


def test_newer_schema_with_unknown_fields_is_accepted() -> None:
    wire = rec().to_wire()
    wire["v"] = 7
    wire["some_future_field"] = [1, 2, 3]
    wire["extras"]["future"] = {"x": 1}
    back = decode_record(msgpack.packb(wire))
    assert back.schema == 7 and back.extras["future"] == {"x": 1}


def test_missing_extras_defaults_to_empty() -> None:
    wire = rec().to_wire()
    del wire["extras"]
    assert decode_record(msgpack.packb(wire)).extras == {}


def test_gateway_record() -> None:
    r = rec(s=0, e=0)
    assert r.is_gateway and decode_record(encode_record(r)).is_gateway


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01\x02",  # a list, not a map
        msgpack.packb({"v": 1}),  # missing fields
        msgpack.packb("just a string"),
        msgpack.ExtType(5, b"xx").data,
        bytes(range(256)),
    ],
)
def test_garbage_raises_record_error_only(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(data)


def test_ext_types_refused() -> None:
    wire = rec().to_wire()
    wire["extras"] = {"x": msgpack.ExtType(3, b"payload")}
    with pytest.raises(RecordError, match="extension"):
        decode_record(msgpack.packb(wire))


@pytest.mark.parametrize(
    "field,value",
    [
        ("peer_id", 5),
        ("peer_id", ""),
        ("addrs", "not-a-list"),
        ("addrs", [1, 2]),
        ("addrs", ["/ip4/1.1.1.1/tcp/1"] * 100),
        ("span_start", "0"),
        ("span_start", True),
        ("span_end", 99),  # beyond total_layers
        ("span_start", 20),  # start > end
        ("total_layers", 0),
        ("throughput", float("nan")),
        ("throughput", -1.0),
        ("time", float("inf")),
        ("free_kv_blocks", -3),
        ("state", "dancing"),
        ("extras", [1]),
        ("v", "1"),
        ("v", 0),
        ("model_hash", "x" * 10_000),
    ],
)
def test_wrong_types_and_ranges(field: str, value: object) -> None:
    wire = rec().to_wire()
    wire[field] = value
    with pytest.raises(RecordError):
        decode_record(msgpack.packb(wire))


def test_empty_span_must_be_zero_zero() -> None:
    with pytest.raises(RecordError):
        rec(s=5, e=5)


def test_huge_record_refused_both_ways() -> None:
    with pytest.raises(RecordError, match="extras are over"):
        rec(extras={"blob": "x" * (MAX_RECORD_BYTES + 10)})
    wire = rec().to_wire()
    wire["extras"] = {"blob": "x" * (MAX_RECORD_BYTES + 10)}
    with pytest.raises(RecordError, match="limit"):
        decode_record(msgpack.packb(wire))


def test_unencodable_extras() -> None:
    with pytest.raises(RecordError):
        encode_record(rec(extras={"obj": object()}))


# ---------------------------------------------------------------------------- table


def test_table_add_renew_expire() -> None:
    t = PeerTable(ttl=6.0)
    assert t.update(rec("A", t=1.0), now=0.0) == "added"
    assert t.update(rec("B", 10, 30, t=1.0), now=0.0) == "added"
    assert t.update(rec("A", t=2.0), now=4.0) == "renewed"
    assert [r.peer_id for r in t.snapshot(now=5.9)] == ["A", "B"]
    assert [r.peer_id for r in t.snapshot(now=6.0)] == ["A"]  # B expired at 6.0, hidden already
    assert t.expire(now=6.0) == ["B"]
    assert t.get("A", now=9.9) is not None and t.get("A", now=10.0) is None
    assert t.expire(now=10.0) == ["A"] and len(t) == 0


def test_stale_record_does_not_overwrite() -> None:
    t = PeerTable(ttl=6.0)
    t.update(rec("A", 0, 10, t=5.0), now=0.0)
    assert t.update(rec("A", 0, 20, t=4.0), now=1.0) == "stale"
    assert t.get("A", now=1.0).span == (0, 10)  # type: ignore[union-attr]


def test_offline_removes_immediately_and_tombstones() -> None:
    t = PeerTable(ttl=6.0)
    t.update(rec("A", t=5.0), now=0.0)
    assert t.update(rec("A", t=6.0, state="offline"), now=1.0) == "removed"
    assert t.snapshot(now=1.0) == []
    # a delayed older online announcement must not resurrect it
    assert t.update(rec("A", t=5.5), now=2.0) == "stale"
    # a restart (newer time) comes back at once
    assert t.update(rec("A", t=7.0), now=3.0) == "added"


def test_tombstone_expires() -> None:
    t = PeerTable(ttl=2.0)
    t.update(rec("A", t=10.0, state="offline"), now=0.0)
    # after ttl the tombstone is gone: even a record with an older clock is taken
    assert t.update(rec("A", t=9.0), now=5.0) == "added"


def test_table_bounded() -> None:
    t = PeerTable(ttl=5.0, max_peers=2)
    t.update(rec("A"), now=0.0)
    t.update(rec("B"), now=0.0)
    assert t.update(rec("C"), now=1.0) == "full"
    assert t.update(rec("C"), now=5.0) == "added"  # A and B expired, room again


def test_default_clock_injected() -> None:
    now = [100.0]
    t = PeerTable(ttl=1.0, clock=lambda: now[0])
    t.update(rec("A"))
    assert t.peer_ids() == ["A"]
    now[0] = 101.0
    assert t.snapshot() == []


# ---------------------------------------------------------------------------- coverage


def test_coverage_complete_chain() -> None:
    c = coverage([rec("A", 0, 10), rec("B", 10, 30), rec("C", 10, 30)], 30)
    assert c.complete and c.chain and c.gaps == () and c.intervals == ((0, 30),)
    assert c.min_replicas == 1 and c.replicas[10] == 2


def test_coverage_gaps() -> None:
    c = coverage([rec("A", 0, 10), rec("B", 15, 20), rec("C", 25, 30)], 30)
    assert c.gaps == ((10, 15), (20, 25)) and not c.complete and not c.chain
    assert c.intervals == ((0, 10), (15, 20), (25, 30))
    assert c.to_dict()["gaps"] == [[10, 15], [20, 25]]


def test_coverage_without_chain() -> None:
    # every layer served, but no sequence of spans joins end to start
    c = coverage([rec("A", 0, 12), rec("B", 10, 30)], 30)
    assert c.complete and not c.chain


def test_coverage_ignores_gateways_offline_and_other_models() -> None:
    recs = [
        rec("G", 0, 0),
        rec("A", 0, 30, state="offline"),
        rec("B", 0, 30, model_hash="cd" * 32),
        rec("C", 0, 24, total_layers=24),
    ]
    c = coverage(recs, 30, model_hash=H)
    assert c.gaps == ((0, 30),) and c.min_replicas == 0 and not c.chain


def test_coverage_empty() -> None:
    c = coverage([], 4)
    assert c.gaps == ((0, 4),) and c.replicas == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        coverage([], 0)


def test_to_dict_is_plain() -> None:
    d = rec(extras={"http": "x"}).to_dict()
    assert d["addrs"] == ["/ip4/127.0.0.1/tcp/1"] and d["schema"] == 1 and math.isclose(d["throughput"], 12.5)


# ---------------------------------------------------------------------------- hostile records


def test_timestamp_ext_in_a_record_is_refused() -> None:
    # msgpack decodes the timestamp ext (-1) natively, without calling ext_hook
    wire = rec().to_wire()
    wire["extras"] = {"when": msgpack.Timestamp(1, 0)}
    with pytest.raises(RecordError, match="extension type -1"):
        decode_record(msgpack.packb(wire))
    wire = rec().to_wire()
    wire["time"] = msgpack.Timestamp(10**9, 0)
    with pytest.raises(RecordError, match="extension"):
        decode_record(msgpack.packb(wire))


@pytest.mark.parametrize(
    "extras,match",
    [
        ({"b": b"raw"}, "bytes"),
        ({"f": float("nan")}, "finite"),
        ({"f": [1.0, float("inf")]}, "finite"),
        ({"deep": {"a": {"b": {"c": {"d": 1}}}}}, "deeper"),
        ({"deep": [[[[1]]]]}, "deeper"),
        ({"many": ["x" * 100] * 200}, "over"),
        ({"k": {1: "int key"}}, "keys"),
        ({"s": {1, 2}}, "set"),
    ],
)
def test_extras_only_plain_bounded_data(extras: dict, match: str) -> None:
    with pytest.raises(RecordError, match=match):
        rec(extras=extras)
    if match not in ("set", "keys"):  # not encodable by a peer in a way that decodes to these
        wire = rec().to_wire()
        wire["extras"] = extras
        with pytest.raises(RecordError):
            decode_record(msgpack.packb(wire, use_bin_type=True))


def test_extras_within_bounds_accepted_and_json_safe() -> None:
    import json

    r = rec(extras={"rtt": {f"p{i}": i * 1.5 for i in range(16)}, "route": ["a", "b"], "x": None,
                    "nested": {"a": {"b": [1, True]}}})
    back = decode_record(encode_record(r))
    d = back.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False))["extras"] == json.loads(json.dumps(r.to_dict()))["extras"]
    d["extras"]["route"].append("mutated")  # a copy: the record is unchanged
    assert back.extras["route"] == ["a", "b"]


def test_check_fresh_bounds_signed_time() -> None:
    from p2p.records import check_fresh

    now = 1_000_000.0
    assert check_fresh(rec(t=now - 11.9), now, max_age=12.0) is None
    assert check_fresh(rec(t=now - 12.1), now, max_age=12.0) == "old"
    assert check_fresh(rec(t=now + 59.0), now, max_age=12.0) is None
    assert check_fresh(rec(t=now + 61.0), now, max_age=12.0) == "future"


def test_per_ip_cap() -> None:
    t = PeerTable(ttl=5.0, max_per_ip=2)
    ip = ["/ip4/10.0.0.1/tcp/1"]
    assert t.update(rec("A", addrs=ip), now=0.0) == "added"
    assert t.update(rec("B", addrs=["/ip4/10.0.0.1/tcp/2/p2p/B"]), now=0.0) == "added"
    assert t.update(rec("C", addrs=ip), now=0.0) == "ip_full"
    assert t.update(rec("C", addrs=["/ip4/10.0.0.2/tcp/1", *ip]), now=0.0) == "ip_full"  # any full host
    # relayed addresses name the relay, not the peer: not counted
    assert t.update(rec("D", addrs=["/ip4/10.0.0.1/tcp/1/p2p/R/p2p-circuit/p2p/D"]), now=0.0) == "added"
    # renewals of peers already counted are never refused
    assert t.update(rec("A", addrs=ip, t=101.0), now=1.0) == "renewed"
    assert t.peers_at("10.0.0.1") == 2
    # a peer moving away frees its slot; IPv6 spellings are one host
    assert t.update(rec("A", addrs=["/ip6/::1/tcp/1"], t=102.0), now=1.0) == "renewed"
    assert t.update(rec("C", addrs=ip), now=1.0) == "added"
    assert t.update(rec("E", addrs=["/ip6/0:0::1/tcp/9"]), now=1.0) == "added"
    assert t.peers_at("::1") == 2
    # expiry and offline records free slots too
    assert t.update(rec("B", addrs=ip, t=200.0, state="offline"), now=2.0) == "removed"
    assert t.peers_at("10.0.0.1") == 1
    t.expire(now=10.0)
    assert t.peers_at("10.0.0.1") == 0 and t.peers_at("::1") == 0 and len(t) == 0


def test_offline_tombstone_outlives_the_replay_window() -> None:
    t = PeerTable(ttl=6.0)  # records stay fresh for 2 ttl: the tombstone lasts as long
    t.update(rec("A", t=5.0), now=0.0)
    t.update(rec("A", t=6.0, state="offline"), now=1.0)
    assert t.update(rec("A", t=5.0), now=1.0 + 11.0) == "stale"  # replay of the last online record
