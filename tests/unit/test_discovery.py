"""Discovery logic over an in-memory pubsub (no libp2p, no sockets), on trio's MockClock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import time

import msgpack
import pytest
import trio
import trio.testing

from p2p.discovery import Discovery, topic_for
from p2p.records import PeerRecord, encode_record

H = "12" * 32


class Bus:
    """Delivers every publish to every subscriber, after its validator (like gossipsub)."""

    def __init__(self) -> None:
        self.subs: list[tuple[FakeNode, str, Callable[[bytes, str], bool] | None, trio.MemorySendChannel[Any]]] = []

    async def publish(self, source: str, topic: str, data: bytes) -> None:
        for node, t, validator, chan in list(self.subs):
            if t != topic or (node.peer_id != source and node.down):
                continue
            if validator is not None and not validator(data, source):
                continue
            chan.send_nowait((data, source))


class FakeNode:
    def __init__(self, bus: Bus, peer_id: str) -> None:
        self.bus, self.peer_id = bus, peer_id
        self.down = False
        self.dialed: list[str] = []

    def addrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}"]

    async def subscribe(self, topic: str, validator: Any = None) -> Any:
        send, recv = trio.open_memory_channel[tuple[bytes, str]](100)
        self.bus.subs.append((self, topic, validator, send))

        class Sub:
            def __aiter__(self) -> Any:
                return recv.__aiter__()

        return Sub()

    async def publish(self, topic: str, data: bytes) -> None:
        if not self.down:
            await self.bus.publish(self.peer_id, topic, data)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self.dialed

    def connected_peers(self) -> list[str]:
        return list(self.dialed)

    async def connect(self, peer_id: str, addrs: list[str], timeout: float) -> None:
        self.dialed.append(peer_id)


def fields(s: int, e: int) -> Callable[[], dict[str, Any]]:
    return lambda: dict(model_name="m", span_start=s, span_end=e, total_layers=30, throughput=10.0, http="h:1")


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.trio
async def test_announce_expire_leave_on_mock_clock(mock_clock: trio.testing.MockClock) -> None:
    bus = Bus()
    a, b, c = FakeNode(bus, "A"), FakeNode(bus, "B"), FakeNode(bus, "C")
    discs = [Discovery(n, H, fields(i * 10, i * 10 + 10), period=1.0, clock=trio.current_time) for i, n in enumerate((a, b, c))]
    da, db, dc = discs
    async with trio.open_nursery() as nursery:
        for d in discs:
            await nursery.start(d.run)
        await trio.sleep(1.5)
        assert [r.peer_id for r in da.table.snapshot()] == ["A", "B", "C"]
        rb = da.table.get("B")
        assert rb is not None and rb.extras == {"http": "h:1"} and rb.addrs == ("/memory/B",)
        assert "B" in a.dialed and "C" in a.dialed  # learned peers are dialled
        # C goes silent: gone after ttl (3 s), not before
        c.down = True
        await trio.sleep(2.0)
        assert "C" in da.table
        await trio.sleep(2.5)
        assert [r.peer_id for r in da.table.snapshot()] == ["A", "B"] and da.stats["expired"] == 1
        # B leaves: removed at once
        await db.leave()
        await trio.sleep(0.01)
        assert "B" not in da.table and da.stats["removed_offline"] == 1
        assert set(da.departed) == {"B"}  # a goodbye, not a silence: C expired without one
        await trio.sleep(5)
        assert [r.peer_id for r in da.table.snapshot()] == ["A"]
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_validator_drops_and_counts(mock_clock: trio.testing.MockClock) -> None:
    bus = Bus()
    a = FakeNode(bus, "A")
    FakeNode(bus, "X")  # a second peer on the bus
    da = Discovery(a, H, fields(0, 30), period=1.0, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(da.run)

        def rec(pid: str, mh: str = H) -> bytes:
            return encode_record(PeerRecord(pid, ("/m",), "m", mh, 0, 30, 30, time=time.time()))

        topic = topic_for(H)
        for data in (b"junk", msgpack.packb([1, 2]), rec("A"), rec("Y"), rec("X", "ff" * 32), rec("X")):
            await bus.publish("X", topic, data)
        await trio.sleep(0.1)
        s = da.stats
        assert (s["received"], s["dropped_bad"], s["dropped_forged"], s["dropped_foreign_model"], s["accepted"]) == (6, 2, 2, 1, 1)
        assert [r.peer_id for r in da.table.snapshot()] == ["A", "X"]
        assert da.table.get("A").model_name == "m"  # type: ignore[union-attr]  # ours, not the forgery
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_announce_now_is_prompt_and_coalesced(mock_clock: trio.testing.MockClock) -> None:
    bus = Bus()
    a = FakeNode(bus, "A")
    load = {"n": 0}
    da = Discovery(a, H, lambda: {**fields(0, 30)(), "active_requests": load["n"]}, period=10.0, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(da.run)
        await trio.sleep(1.0)
        assert da.stats["published"] == 1
        load["n"] = 3
        for _ in range(5):
            da.announce_now()
        await trio.sleep(1.0)
        assert da.stats["published"] == 2  # five wake-ups, one publish
        assert da.table.get("A").active_requests == 3  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


def test_record_fn_errors_are_clear() -> None:
    d = Discovery(FakeNode(Bus(), "A"), H, lambda: {"span_start": 0}, period=1.0)
    with pytest.raises(ValueError, match="record_fn"):
        d.my_record()


@pytest.mark.trio
async def test_replayed_future_and_crowded_records_dropped(mock_clock: trio.testing.MockClock) -> None:
    bus = Bus()
    a = FakeNode(bus, "A")
    wall = [1_000_000.0]
    da = Discovery(a, H, fields(0, 30), period=1.0, clock=trio.current_time, wall_clock=lambda: wall[0],
                   max_per_ip=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(da.run)
        topic = topic_for(H)

        def rec(pid: str, t: float, ip: str = "10.0.0.9") -> bytes:
            return encode_record(PeerRecord(pid, (f"/ip4/{ip}/tcp/1",), "m", H, 0, 30, 30, time=t))

        fresh = rec("X", wall[0] - 1)
        await bus.publish("X", topic, fresh)
        await bus.publish("Y", topic, rec("Y", wall[0] - 10 * da.ttl))  # old: replayed
        await bus.publish("Z", topic, rec("Z", wall[0] + 3600))  # an hour ahead
        await bus.publish("W", topic, rec("W", wall[0]))
        await bus.publish("V", topic, rec("V", wall[0]))  # third peer on 10.0.0.9
        await trio.sleep(0.1)
        s = da.stats
        assert (s["dropped_old"], s["dropped_future"], s["dropped_ip_full"]) == (1, 1, 1)
        assert [r.peer_id for r in da.table.snapshot()] == ["A", "W", "X"]
        # the same fresh record replayed later, after X went silent and expired: refused
        await trio.sleep(da.ttl + 1)
        wall[0] += da.max_record_age + 1
        await bus.publish("X", topic, fresh)
        await trio.sleep(0.1)
        assert da.stats["dropped_old"] == 2 and "X" not in da.table
        nursery.cancel_scope.cancel()
