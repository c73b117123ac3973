"""A peer whose pubsub registration breaks (py-libp2p keeps one pubsub stream per peer id; a
peer restarting with the same identity can leave the old one registered, or its sending task
ended) is disconnected and dialed again by the node's repair loop: a fresh connection rebuilds
pubsub state on both sides. Real hosts on 127.0.0.1."""

from __future__ import annotations

import trio

from p2p.host import pubsub_fault
from tests.integration.test_perimeter_host import addr_of, node
from tests.integration.test_swarm import wait_until

TOPIC = "molink/test-repair/1"


def test_pubsub_fault_says_what_is_wrong() -> None:
    assert pubsub_fault(has_stream=True, stream_on_live_conn=True, queue_open=True) is None
    assert "without a pubsub stream" in pubsub_fault(has_stream=False, stream_on_live_conn=False, queue_open=False)
    assert "gone" in pubsub_fault(has_stream=True, stream_on_live_conn=False, queue_open=True)
    assert "nothing sends" in pubsub_fault(has_stream=True, stream_on_live_conn=True, queue_open=False)


async def test_a_peer_nothing_is_sent_to_any_more_is_reconnected() -> None:
    async with node() as a, node(bootstrap=tuple(addr_of(a)[:1])) as b:
        got: list[bytes] = []
        sub = await b.subscribe(TOPIC)
        await a.subscribe(TOPIC)

        async def receive() -> None:
            async for data, _ in sub:
                got.append(data)

        async with trio.open_nursery() as n:
            n.start_soon(receive)
            await wait_until(lambda: b.peer_id in a.topic_peers(TOPIC), 20, "b in a's topic")

            async def published(tag: bytes) -> bool:
                await a.publish(TOPIC, tag)
                await trio.sleep(0.5)
                return tag in got

            i = 0
            while not await published(b"before %d" % i):
                i += 1
                assert i < 20, "a's messages never reached b"
            # the failure the soak hit: a's sending task for b ends, b stays registered
            pid_b = next(p for p in a.pubsub.peers if p.to_base58() == b.peer_id)
            a.pubsub.peer_queues[pid_b].close()
            await trio.sleep(0.5)
            assert not await published(b"while broken")
            assert a.pubsub_repairs == 0
            with trio.fail_after(40):
                i = 0
                while not await published(b"after %d" % i):
                    i += 1
            assert a.pubsub_repairs >= 1
            assert a.limits_status()["pubsub_repairs"] == a.pubsub_repairs
            n.cancel_scope.cancel()
