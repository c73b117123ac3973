"""A misbehaving swarm peer for tests: announces a span of the right model (with a tempting
throughput) and answers ``/molink/stage/1`` streams with garbage bytes.

usage: python evil_peer.py BOOTSTRAP MODEL_HASH START END SECONDS
Prints ``READY <peer id>`` once announcing; exits by itself after SECONDS.
"""

import os
import sys

import trio

from molinkd.bridge import STAGE_PROTOCOL
from p2p.discovery import Discovery
from p2p.host import NodeConfig, open_node


async def main() -> None:
    boot, model_hash, start, end, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(
        sys.argv[5])
    cfg = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=(boot,))
    with trio.move_on_after(seconds):
        async with open_node(cfg) as node, trio.open_nursery() as nursery:
            async def garbage(stream, remote) -> None:
                await stream.send_raw(b"\xff\xff\xff\xff" + os.urandom(64))  # an absurd frame length
                await trio.sleep(1)

            node.set_stream_handler(STAGE_PROTOCOL, garbage)

            def record() -> dict:
                return {"model_name": "evil", "span_start": start, "span_end": end, "total_layers": 30,
                        "throughput": 1e6, "extras": {"role": "stage", "engine": "ready"}}

            disc = Discovery(node, model_hash, record, period=1.0)
            await nursery.start(disc.run)
            print("READY", node.peer_id, flush=True)
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
