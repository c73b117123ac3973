"""Hostile peers against the libp2p host's perimeter (p2p.host), with real hosts on 127.0.0.1.

Each test plays one attack from a real second host and shows it refused or contained while an
honest peer's request keeps being served. No vLLM: seconds per test.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2p.discovery import Discovery
from p2p.host import (
    AllowListError,
    DialError,
    IdentityError,
    IdentityInUse,
    Node,
    NodeConfig,
    TokenBucket,
    load_or_create_identity,
    open_node,
    read_allow_peers,
    read_swarm_key,
    write_swarm_key,
)
from p2p.streams import FramedStream, StreamClosed
from tests.integration.test_swarm import LOCAL, MODEL, span_fn, wait_until

ECHO = "/molink/test-echo/1"


async def echo_handler(stream: FramedStream, remote: str) -> None:
    """A well-behaved server: first frame within a deadline (slowloris bound), echo it back."""
    frame = await stream.recv(timeout=5)
    await stream.send("echo", {"from": remote, "body": frame.body})


@contextlib.asynccontextmanager
async def node(**cfg: Any) -> AsyncIterator[Node]:
    async with open_node(NodeConfig(listen=LOCAL, **cfg)) as n:
        yield n


def addr_of(n: Node) -> list[str]:
    return [a for a in n.addrs() if "/127.0.0.1/" in a]


async def ask_echo(client: Node, server: Node, payload: str = "hi", timeout: float = 10) -> dict:
    fs = await client.open_stream(server.peer_id, ECHO, addr_of(server), timeout=timeout)
    try:
        await fs.send("ask", payload)
        return (await fs.recv(timeout=timeout)).body
    finally:
        await fs.close()


# ------------------------------------------------------------------------------ allow list


async def test_allow_peers_admits_listed_peers_only(tmp_path: Path) -> None:
    async with node() as honest, node() as stranger:
        allow = tmp_path / "allow"
        allow.write_text(f"# the swarm's members\n{honest.peer_id}  # honest\n\n")
        allowed = read_allow_peers(allow)
        assert allowed == {honest.peer_id}
        async with node(allow_peers=allowed) as guarded:
            guarded.set_stream_handler(ECHO, echo_handler)
            assert guarded.peer_allowed(honest.peer_id) and not guarded.peer_allowed(stranger.peer_id)
            # the stranger cannot open a stream: its connection is closed, its streams reset
            for _ in range(3):
                with pytest.raises((DialError, StreamClosed, trio.TooSlowError)):
                    await ask_echo(stranger, guarded, timeout=3)
            await wait_until(lambda: not guarded.is_connected(stranger.peer_id), 5, "stranger disconnected")
            assert guarded.refused_connections >= 1
            # while the listed peer is served
            assert (await ask_echo(honest, guarded))["body"] == "hi"
            assert guarded.is_connected(honest.peer_id)


async def test_allow_peers_drops_announcements_of_unlisted_signers(tmp_path: Path) -> None:
    """The stranger's record reaches the guarded peer only through an honest forwarder (its own
    connection is closed); it is dropped on its signer, while the honest peer's record is kept."""
    async with node() as hub, node() as stranger:
        hub_addr = addr_of(hub)[0]
        async with node(bootstrap=(hub_addr,)) as honest:
            allowed = frozenset({hub.peer_id, honest.peer_id})
            async with node(bootstrap=(hub_addr,), allow_peers=allowed) as guarded, trio.open_nursery() as n:
                await stranger.connect(hub.peer_id, [hub_addr])
                discs = {}
                for name, nd, span in (("hub", hub, (0, 10)), ("stranger", stranger, (10, 20)),
                                       ("honest", honest, (20, 30)), ("guarded", guarded, (0, 30))):
                    discs[name] = Discovery(nd, MODEL, span_fn(*span), period=0.3)
                    await n.start(discs[name].run)
                table = discs["guarded"].table
                await wait_until(lambda: {r.peer_id for r in discs["hub"].table.snapshot()} >= {
                    stranger.peer_id, honest.peer_id, guarded.peer_id}, 20, "hub hears everyone")
                await wait_until(lambda: {r.peer_id for r in table.snapshot()} >= {hub.peer_id, honest.peer_id},
                                 20, "guarded hears the listed peers")
                await trio.sleep(1.5)  # several announcement periods of the stranger
                assert stranger.peer_id not in {r.peer_id for r in table.snapshot()}
                n.cancel_scope.cancel()


def test_allow_list_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("12D3KooWnotapeerid\n")
    with pytest.raises(AllowListError, match=r"bad:1: .* is not a peer id"):
        read_allow_peers(bad)
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    with pytest.raises(AllowListError, match="lists no peer id"):
        read_allow_peers(empty)
    link = tmp_path / "link"
    link.symlink_to(bad)
    with pytest.raises(AllowListError, match="symlink"):
        read_allow_peers(link)


# ------------------------------------------------------------------------------ stream floods


async def test_stream_flood_is_reset_while_honest_peer_is_served() -> None:
    """A peer opens 600 streams that never send a byte (slowloris on every stream at once): the
    host holds at most max_streams_per_protocol of them per peer in handlers and resets the rest at
    once; the honest peer's request is answered meanwhile, and the flood's held streams end at the
    handler's first-frame deadline."""
    async with node(max_streams_per_peer=200, max_streams_per_protocol=32) as server, \
            node() as flooder, node() as honest:
        server.set_stream_handler(ECHO, echo_handler)
        await flooder.connect(server.peer_id, addr_of(server))
        held: list[Any] = []
        refused = 0

        async def open_one() -> None:
            nonlocal refused
            try:
                with trio.fail_after(10):
                    raw = await flooder.host.new_stream(server.host.get_id(), [ECHO])
                held.append(raw)
            except Exception:
                refused += 1

        latencies = []
        async with trio.open_nursery() as n:
            for _ in range(600):
                n.start_soon(open_one)

            async def honest_requests() -> None:
                for i in range(5):
                    t0 = trio.current_time()
                    assert (await ask_echo(honest, server, f"q{i}"))["body"] == f"q{i}"
                    latencies.append(trio.current_time() - t0)

            n.start_soon(honest_requests)
        assert len(latencies) == 5
        refused_by_server = sum(server.resources.refused.values()) + server.refused_streams[ECHO]
        assert refused_by_server >= 600 - 200, (server.resources.refused, server.refused_streams)
        # streams that got a handler slot never exceed the cap
        assert server._handler_runs[(flooder.peer_id, ECHO)] <= 32
        # the held ones end at the handler's first-frame deadline (5 s), not never
        await wait_until(lambda: server._handler_runs[(flooder.peer_id, ECHO)] == 0, 15, "flood streams ended")
        assert (await ask_echo(honest, server, "after"))["body"] == "after"
        for raw in held:
            with contextlib.suppress(Exception):
                await raw.reset()


async def test_peer_ignoring_flow_control_is_disconnected() -> None:
    """A peer writes yamux DATA frames past its receive window on a stream the server does not read:
    py-libp2p would buffer without bound; our host closes that peer's connection at the cap while an
    honest peer keeps being served."""
    slow = "/molink/test-slow/1"
    async with node(max_buffered_bytes_per_peer=8 << 20) as server, node() as attacker, node() as honest:
        server.set_stream_handler(ECHO, echo_handler)

        async def never_reads(stream: FramedStream, remote: str) -> None:
            await trio.sleep(30)

        server.set_stream_handler(slow, never_reads)
        await attacker.connect(server.peer_id, addr_of(server))
        raw = await attacker.host.new_stream(server.host.get_id(), [slow])
        ys = raw.muxed_stream
        conn = ys.conn
        chunk = os.urandom(1 << 20)
        sent = 0
        with trio.move_on_after(15):
            while sent < 64 << 20 and not conn.event_shutting_down.is_set():
                header = struct.pack("!BBHII", 0, 0, 0, ys.stream_id, len(chunk))  # DATA, no window check
                try:
                    await conn._write_frame(header + chunk)
                except Exception:
                    break
                sent += len(chunk)
                if sent % (4 << 20) == 0:
                    assert (await ask_echo(honest, server, "meanwhile"))["body"] == "meanwhile"
        await wait_until(lambda: not server.is_connected(attacker.peer_id), 10, "attacker disconnected")
        assert sent < 32 << 20, f"the server took {sent} bytes past an 8 MiB cap"
        assert (await ask_echo(honest, server))["body"] == "hi"


# ------------------------------------------------------------------------------ pubsub


async def test_pubsub_spammer_is_rate_limited_while_announcements_flow() -> None:
    async with node() as hub:
        hub_addr = addr_of(hub)[0]
        # a modified client: its own gossipsub would not send more than 20/s
        async with node(bootstrap=(hub_addr,), gossip_max_msgs_per_second=1e6) as spammer, node(bootstrap=(hub_addr,)) as honest, \
                trio.open_nursery() as n:
            d_hub = Discovery(hub, MODEL, span_fn(0, 15), period=0.3)
            d_honest = Discovery(honest, MODEL, span_fn(15, 30), period=0.3)
            await n.start(d_hub.run)
            await n.start(d_honest.run)
            await spammer.pubsub.subscribe(d_hub.topic)
            await wait_until(lambda: honest.peer_id in {r.peer_id for r in d_hub.table.snapshot()}, 20,
                             "honest peer known")
            await wait_until(lambda: spammer.peer_id in [p for p in hub.topic_peers(d_hub.topic)], 10,
                             "spammer in the topic")
            t0 = trio.current_time()
            for i in range(300):  # ~100 messages/s for ~3 s
                await spammer.pubsub.publish(d_hub.topic, b"junk %d" % i)
                await trio.sleep(0.01)
            await wait_until(lambda: hub.dropped_source_rate + d_hub.stats["dropped_bad"] >= 250, 10,
                             "the spam reached the hub")
            spam_seconds = trio.current_time() - t0
            # only the signer's burst plus its rate reached the record decoder; the rest was dropped
            assert d_hub.stats["dropped_bad"] <= 20 + 5 * spam_seconds + 5, (d_hub.stats, spam_seconds)
            assert hub.dropped_source_rate >= 150
            # the honest peer's announcements still arrive, fresh
            t_before = d_hub.table.snapshot()
            rec = next(r for r in t_before if r.peer_id == honest.peer_id)
            await wait_until(lambda: next(r for r in d_hub.table.snapshot() if r.peer_id == honest.peer_id).time
                             > rec.time, 5, "a fresh announcement of the honest peer")
            n.cancel_scope.cancel()


def test_token_bucket() -> None:
    b = TokenBucket(rate=2.0, burst=3.0)
    assert [b.allow("p", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow("p", now=0.5)  # one token back after 0.5 s at 2/s
    assert not b.allow("p", now=0.5)
    assert b.allow("q", now=0.5)  # keys are independent


# ------------------------------------------------------------------------------ key files


def test_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    load_or_create_identity(key)
    key.chmod(0o644)
    with pytest.raises(IdentityError, match=f"chmod 600 {key}"):
        load_or_create_identity(key)
    key.chmod(0o600)
    load_or_create_identity(key)
    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(IdentityError, match="symlink"):
        load_or_create_identity(link)


def test_swarm_key_symlink_is_refused(tmp_path: Path) -> None:
    from p2p.host import SwarmKeyError

    k = tmp_path / "swarm.key"
    write_swarm_key(k)
    assert len(read_swarm_key(k)) == 64
    link = tmp_path / "link"
    link.symlink_to(k)
    with pytest.raises(SwarmKeyError, match="symlink"):
        read_swarm_key(link)


async def test_second_node_with_the_same_identity_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    async with node(identity_path=key) as first:
        with pytest.raises(IdentityInUse, match=rf"pid {os.getpid()}\b.*--identity"):
            async with node(identity_path=key):
                pass
        assert first.peer_id
    async with node(identity_path=key) as again:  # released when the first one stopped
        assert again.peer_id == first.peer_id
