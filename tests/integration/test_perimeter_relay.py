"""The relay service's limits, with real hosts on 127.0.0.1: a public relay, a private peer holding a
reservation on it, and a peer that reaches the private one only through a circuit. DCUtR is off so
the circuit stays relayed on loopback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import trio

from p2p import nat
from p2p.host import Node, NodeConfig, open_node
from p2p.streams import FramedStream, StreamClosed
from tests.integration.test_swarm import wait_until

LOCAL = ("/ip4/127.0.0.1/tcp/0",)
SINK = "/molink/test-sink/1"


@contextlib.asynccontextmanager
async def peer(**nat_kw: Any) -> AsyncIterator[tuple[Node, nat.NatService]]:
    async with open_node(NodeConfig(listen=LOCAL)) as node, trio.open_nursery() as n:
        svc = await n.start(nat.run_nat_services, node, nat.NatConfig(dcutr=False, **nat_kw))
        yield node, svc
        n.cancel_scope.cancel()


def loopback(node: Node) -> str:
    return next(a for a in node.addrs() if "/127.0.0.1/" in a and "p2p-circuit" not in a)


async def sink(stream: FramedStream, remote: str) -> None:
    """Reads frames, acknowledges each with its size (a stream that carries data both ways)."""
    while True:
        try:
            frame = await stream.recv(timeout=30)
        except StreamClosed:
            return
        await stream.send("ack", len(frame.body))


@contextlib.asynccontextmanager
async def relayed_pair(**limits: Any) -> AsyncIterator[tuple[nat.NatService, Node, Node, str]]:
    """(relay service, private peer, dialer, circuit address of the private peer)."""
    async with peer(reachability="public", **limits) as (relay, rsvc):
        async with peer(reachability="private", relays=(loopback(relay),)) as (private, psvc), \
                peer(reachability="private") as (dialer, dsvc):
            private.set_stream_handler(SINK, sink)
            await wait_until(lambda: relay.host.get_id() in psvc._reservations, 20, "a reservation on the relay")
            circuit = f"{loopback(relay)}/p2p-circuit/p2p/{private.peer_id}"
            assert await dsvc.connect(private.peer_id, [circuit]) == "relayed"
            yield rsvc, private, dialer, circuit


async def test_relay_enforces_the_configured_limits() -> None:
    limits = dict(circuit_duration=120, circuit_data=5 << 20, max_circuits_per_peer=3, max_reservations=7,
                  max_hop_streams_per_peer=2)
    async with peer(reachability="public", **limits) as (_, svc):
        assert svc.serving_relay
        got = svc.relay_limits()
        assert got == {"circuit_duration": 120, "circuit_data": 5 << 20, "max_circuits_per_peer": 3,
                       "max_reservations": 7, "reservation_ttl": 3600, "max_hop_streams_per_peer": 2}
        # the objects the library enforces with
        assert svc.protocol.resource_manager.limits.max_reservations == 7
        assert svc.status()["relay_limits"] == got
    defaults = nat.NatConfig()
    assert 0 < defaults.circuit_duration <= 3600 and 0 < defaults.circuit_data <= 1 << 30


async def test_circuit_is_cut_after_its_data_limit_and_redialled() -> None:
    async with relayed_pair(circuit_data=256 << 10) as (_, private, dialer, circuit):
        fs = await dialer.open_stream(private.peer_id, SINK)
        sent = 0
        cut = False
        with trio.fail_after(30):
            try:
                for _ in range(64):  # up to 4 MiB in 64 KiB frames
                    await fs.send("data", os.urandom(64 << 10))
                    await fs.recv(timeout=10)
                    sent += 64 << 10
            except (StreamClosed, ConnectionError, trio.TooSlowError, Exception):
                cut = True
        await fs.close()
        assert cut, "the relay carried 4 MiB over a 256 KiB circuit"
        assert sent <= 512 << 10
        # a new circuit serves the next (small) request: the limit contains, it does not ban
        await wait_until(lambda: not dialer.is_connected(private.peer_id), 10, "the cut circuit gone")
        await dialer.connect(private.peer_id, [circuit], timeout=15)
        fs = await dialer.open_stream(private.peer_id, SINK)
        await fs.send("data", b"small")
        assert (await fs.recv(timeout=10)).body == 5
        await fs.close()


async def test_hop_stream_flood_is_reset_while_reservations_work() -> None:
    async with peer(reachability="public", max_hop_streams_per_peer=4) as (relay, rsvc):
        async with open_node(NodeConfig(listen=LOCAL)) as flooder:
            await flooder.connect(relay.peer_id, [loopback(relay)])
            held = []
            # open HOP streams and hold them (never send a request): past 4, each is reset. On a
            # loaded machine an attempt can time out before the relay sees it, so keep opening
            # (bounded) until 8 have been refused
            for _ in range(40):
                with contextlib.suppress(Exception), trio.fail_after(15):
                    held.append(await flooder.host.new_stream(relay.host.get_id(), [nat.HOP_PROTOCOL_ID]))
                if rsvc.hop_refused >= 8:
                    break
            await wait_until(lambda: rsvc.hop_refused >= 8, 60, "excess HOP streams reset")
            assert rsvc._hop_streams.get(flooder.host.get_id(), 0) <= 4
            # an honest private peer still gets its reservation
            async with peer(reachability="private", relays=(loopback(relay),)) as (_, psvc):
                await wait_until(lambda: relay.host.get_id() in psvc._reservations, 90, "honest reservation")
            for s in held:
                with contextlib.suppress(Exception):
                    await s.reset()
