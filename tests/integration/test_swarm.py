"""The swarm layer with real libp2p hosts on 127.0.0.1 (ephemeral ports, no vLLM).

Every wait is bounded (``wait_until``) with generous deadlines that a loaded machine cannot
miss; periods and TTLs are short so the whole file runs in seconds. No assertion depends on
how fast the machine is: a polite leave is told from an expiry by the discovery counters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from p2p.discovery import Discovery, topic_for
from p2p.host import DialError, IdentityError, Node, NodeConfig, load_or_create_identity, open_node, peer_id_of, write_swarm_key
from p2p.records import PeerRecord, coverage, encode_record
from p2p.streams import FramedStream

LOCAL = ("/ip4/127.0.0.1/tcp/0",)
MODEL = "5e" * 32
L = 30


async def wait_until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    t0 = trio.current_time()
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(step)
        return trio.current_time() - t0
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def span_fn(s: int, e: int, **extra: Any) -> Callable[[], dict[str, Any]]:
    return lambda: dict(
        model_name="smollm2",
        span_start=s,
        span_end=e,
        total_layers=L,
        free_kv_blocks=100,
        throughput=50.0,
        active_requests=0,
        version="test",
        **extra,
    )


@contextlib.asynccontextmanager
async def swarm_peer(
    span: tuple[int, int] | None,
    bootstrap: tuple[str, ...] = (),
    period: float = 0.3,
    ttl: float | None = None,
    **cfg: Any,
) -> AsyncIterator[tuple[Node, Discovery | None, trio.CancelScope]]:
    """A node (plus Discovery if ``span``) in its own cancel scope: cancel it to kill the peer
    silently (no goodbye)."""
    with trio.CancelScope() as scope:
        async with open_node(NodeConfig(listen=LOCAL, bootstrap=bootstrap, **cfg)) as node:
            async with trio.open_nursery() as nursery:
                disc = None
                if span is not None:
                    disc = Discovery(node, MODEL, span_fn(*span, http=f"127.0.0.1:{span[0] + 8000}"), period=period, ttl=ttl)
                    await nursery.start(disc.run)
                yield node, disc, scope
                nursery.cancel_scope.cancel()


def ids(disc: Discovery) -> set[str]:
    return {r.peer_id for r in disc.table.snapshot()}


@pytest.mark.trio
async def test_three_peers_join_through_one_bootstrap() -> None:
    t0 = time.monotonic()
    async with swarm_peer((0, 10)) as (a, da, _):
        boot = (a.addrs()[0],)
        async with swarm_peer((10, 20), boot) as (b, db, _), swarm_peer((20, 30), boot) as (c, dc, _):
            everyone = {a.peer_id, b.peer_id, c.peer_id}
            took = await wait_until(lambda: all(ids(d) == everyone for d in (da, db, dc)), 30, "all tables complete")  # type: ignore[union-attr]
            cov = coverage(dc.table.snapshot(), L, MODEL)  # type: ignore[union-attr]
            assert cov.complete and cov.chain, cov
            rb = dc.table.get(b.peer_id)  # type: ignore[union-attr]
            assert rb is not None and rb.span == (10, 20) and rb.extras["http"] == "127.0.0.1:8010"
            assert rb.addrs and rb.addrs[0].endswith(f"/p2p/{b.peer_id}")
            # B and C only knew A; they found each other through the announcements
            await wait_until(lambda: c.is_connected(b.peer_id) or b.is_connected(c.peer_id), 30, "B-C direct connection")
            st = b.bootstrap_status()
            assert st[0]["connected"] and st[0]["attempts"] >= 1 and st[0]["last_error"] is None
            assert da.stats["dropped_bad"] == 0 and da.stats["received"] > 0  # type: ignore[union-attr]
    print(f"join: tables complete after {took:.2f}s; test {time.monotonic() - t0:.2f}s")


@pytest.mark.trio
async def test_expiry_after_silent_stop_and_immediate_removal_on_leave() -> None:
    # a TTL of 8 periods: a loaded machine that delays a few announcements expires no one early
    period, ttl = 0.5, 4.0
    async with swarm_peer((0, 10), period=period, ttl=ttl) as (a, da, _):
        boot = (a.addrs()[0],)
        async with swarm_peer((10, 20), boot, period=period, ttl=ttl) as (b, db, _):
            async with swarm_peer((20, 30), boot, period=period, ttl=ttl) as (c, dc, c_scope):
                await wait_until(lambda: len(ids(da)) == 3, 30, "A sees 3 peers")  # type: ignore[arg-type]
                # C dies silently: A keeps it until the TTL runs out, then drops it
                c_scope.cancel()
            t_stop = trio.current_time()
            await wait_until(lambda: c.peer_id not in ids(da), ttl + 30, "C expired")  # type: ignore[arg-type]
            gone_after = trio.current_time() - t_stop
            assert gone_after >= ttl / 2, gone_after  # not removed early (4 periods of margin for late announcements)
            # (snapshots hide an expired entry at once; the expiry sweep counts it just after)
            await wait_until(lambda: da.stats["expired"] >= 1, 30, "expiry counted")  # type: ignore[union-attr]
            assert da.stats["removed_offline"] == 0  # type: ignore[union-attr]
            # B leaves politely: removed on its offline record (counted as such), not by expiry
            assert b.peer_id in ids(da)  # type: ignore[arg-type]
            expired = da.stats["expired"]  # type: ignore[union-attr]
            await db.leave()  # type: ignore[union-attr]
            await wait_until(lambda: b.peer_id not in ids(da), 30, "B removed after leave")  # type: ignore[arg-type]
            assert da.stats["removed_offline"] == 1  # type: ignore[union-attr]
            assert da.stats["expired"] == expired  # type: ignore[union-attr]
            # and it stays gone although it was not renewed nor re-added
            await trio.sleep(3 * period)
            assert b.peer_id not in ids(da)  # type: ignore[arg-type]


@pytest.mark.trio
async def test_identity_persists_across_restarts(tmp_path: Path) -> None:
    key = tmp_path / "deep" / "dir" / "identity.key"
    async with open_node(NodeConfig(listen=LOCAL, identity_path=key)) as n1:
        first = n1.peer_id
    assert key.exists() and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    async with open_node(NodeConfig(listen=LOCAL, identity_path=key)) as n2:
        assert n2.peer_id == first
        assert all(a.endswith(f"/p2p/{first}") for a in n2.addrs())
    other = tmp_path / "other.key"
    async with open_node(NodeConfig(listen=LOCAL, identity_path=other)) as n3:
        assert n3.peer_id != first
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(IdentityError):
        load_or_create_identity(bad)
    assert bad.read_bytes() == b"not a key"  # never overwritten


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.trio
async def test_unreachable_bootstrap_keeps_retrying_then_connects(tmp_path: Path) -> None:
    key = tmp_path / "boot.key"
    boot_id = peer_id_of(load_or_create_identity(key))
    port = _free_port()
    boot_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id}"
    cfg = dict(bootstrap_backoff_initial=0.2, bootstrap_backoff_max=0.5, dial_timeout=1.0)
    async with swarm_peer((0, 30), (boot_addr,), **cfg) as (n, dn, _):
        await wait_until(lambda: n.bootstrap_status()[0]["attempts"] >= 3, 30, "3 failed attempts")
        st = n.bootstrap_status()[0]
        assert not st["connected"] and st["last_error"] and boot_id in st["last_error"]
        # the bootstrap comes up later (after more than libp2p's 3-failure give-up)
        async with open_node(NodeConfig(listen=(f"/ip4/127.0.0.1/tcp/{port}",), identity_path=key)) as boot:
            assert boot.peer_id == boot_id
            await wait_until(lambda: n.bootstrap_status()[0]["connected"], 30, "bootstrap reconnect")
            assert n.is_connected(boot_id)


@pytest.mark.trio
async def test_swarm_key_rejects_other_keys(tmp_path: Path) -> None:
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    write_swarm_key(k1)
    write_swarm_key(k2)
    fast = dict(handshake_timeout=1.0, dial_timeout=1.5, bootstrap_backoff_initial=0.2, bootstrap_backoff_max=0.5)
    async with swarm_peer((0, 15), swarm_key_path=k1, **fast) as (a, da, _):
        boot = (a.addrs()[0],)
        async with swarm_peer((15, 30), boot, swarm_key_path=k1, **fast) as (b, db, _), swarm_peer(
            (15, 30), boot, swarm_key_path=k2, **fast
        ) as (c, dc, _), swarm_peer((15, 30), boot, **fast) as (d, dd, _):
            await wait_until(lambda: ids(da) == {a.peer_id, b.peer_id}, 30, "same-key peer joins")  # type: ignore[arg-type]
            # give the wrong-key and no-key peers several attempts
            await wait_until(lambda: c.bootstrap_status()[0]["attempts"] >= 2 and d.bootstrap_status()[0]["attempts"] >= 2, 30, "retries")
            for outsider, disc in ((c, dc), (d, dd)):
                assert outsider.peer_id not in ids(da) and outsider.peer_id not in ids(db)  # type: ignore[arg-type]
                assert ids(disc) == {outsider.peer_id}  # type: ignore[arg-type]
                assert not outsider.bootstrap_status()[0]["connected"]
                assert not outsider.is_connected(a.peer_id)
            with pytest.raises(DialError):
                await c.open_stream(a.peer_id, "/molink/test/echo/1", a.addrs(), timeout=2.0)


@pytest.mark.trio
async def test_bad_forged_and_foreign_records_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="p2p.discovery")
    topic = topic_for(MODEL)
    async with swarm_peer((0, 30)) as (a, da, _):
        assert da is not None
        # X runs no Discovery (so no validator of its own) and publishes by hand
        async with swarm_peer(None, (a.addrs()[0],)) as (x, _, _):
            await x.subscribe(topic)
            await wait_until(lambda: x.peer_id in a.topic_peers(topic) and a.peer_id in x.topic_peers(topic), 30, "topic mesh")

            def record(pid: str, model_hash: str = MODEL) -> bytes:
                r = PeerRecord(
                    peer_id=pid, addrs=x.addrs(), model_name="m", model_hash=model_hash, span_start=0, span_end=30,
                    total_layers=L, time=time.time(),
                )  # fmt: skip
                return encode_record(r)

            await x.publish(topic, b"\x00garbage\xff" * 10)
            await x.publish(topic, b"\x93\x01\x02")  # valid msgpack, not a record
            await x.publish(topic, record(a.peer_id))  # claims to be A
            await x.publish(topic, record("12D3KooWnotreallyapeerid"))  # claims another peer
            await x.publish(topic, record(x.peer_id, model_hash="ff" * 32))  # other model
            await x.publish(topic, record(x.peer_id))  # honest: accepted
            await wait_until(lambda: x.peer_id in ids(da), 30, "honest record accepted")
            s = da.stats
            assert (s["dropped_bad"], s["dropped_forged"], s["dropped_foreign_model"]) == (2, 2, 1), s
            # A's own entry is still its own record, not the forged one
            mine = da.table.get(a.peer_id)
            assert mine is not None and mine.addrs[0].endswith(a.peer_id)
    text = caplog.text
    assert "dropped a bad peer record" in text and "forged" in text and "another model" in text


@pytest.mark.trio
async def test_custom_protocol_round_trip_ping_and_dial_errors() -> None:
    proto = "/molink/test/echo/1"
    seen: list[str] = []

    async def echo(fs: FramedStream, remote: str) -> None:
        seen.append(remote)
        while True:
            f = await fs.recv(timeout=5)
            if f.type == "bye":
                return
            await fs.send("echo", {"n": f.body["n"], "blob": f.body["blob"]})

    async with swarm_peer(None) as (a, _, _), swarm_peer(None) as (b, _, _):
        a.set_stream_handler(proto, echo)
        fs = await b.open_stream(a.peer_id, proto, a.addrs(), timeout=5)
        blob = os.urandom(3 << 20)  # bigger than one libp2p read
        for n in range(3):
            await fs.send("req", {"n": n, "blob": blob})
            f = await fs.recv(timeout=5)
            assert f.type == "echo" and f.body["n"] == n and f.body["blob"] == blob
        await fs.send("bye")
        await fs.close()
        assert seen == [b.peer_id]
        assert b.is_connected(a.peer_id) and a.peer_id in b.connected_peers()
        # Noise only (no secio, no /plaintext/2.0.0), yamux only
        assert b.security_protocols()["security"] == ["/noise"] and b.security_protocols()["muxer"] == ["/yamux/1.0.0"]
        rtt = await b.ping(a.peer_id, timeout=5)
        assert rtt > 0
        with pytest.raises(DialError, match="/molink/nope"):
            await b.open_stream(a.peer_id, "/molink/nope/1", timeout=3)
        port = _free_port()  # nobody listens there
        t0 = trio.current_time()
        with pytest.raises(DialError):
            await b.open_stream(
                "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", proto, [f"/ip4/127.0.0.1/tcp/{port}"], timeout=3
            )
        assert trio.current_time() - t0 < 30  # the dial gave up (3 s timeout) instead of hanging
