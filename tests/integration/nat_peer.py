"""A swarm peer for the NAT tests: ``p2p.host`` node + ``p2p.nat`` services, JSON lines out.

Run inside a namespace (see netns.py)::

    python tests/integration/nat_peer.py --listen /ip4/10.99.1.2/tcp/4001 \\
        --bootstrap /ip4/10.99.0.1/tcp/4001/p2p/<id> --expect 1 --lifetime 40

Prints one JSON object per line: ``up`` (id, addrs), ``reachability``, ``advertised``,
``table`` (peer table changes), ``stream`` (a test stream to a peer worked, with the
connection kind and time), ``kind`` (a peer's connection changed between relayed and
direct), and finally ``done`` with the table and connection kinds. Exits by itself:
after ``--lifetime`` seconds, or ``--settle`` seconds after every expected peer has
answered a stream (earlier if all are direct).

The peer table is p2p.discovery's (signed PeerRecord announcements incl. addrs, every 1 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from p2p import nat  # noqa: E402
from p2p.discovery import Discovery  # noqa: E402
from p2p.host import NodeConfig, open_node  # noqa: E402

ECHO = "/molink/nat-test/echo/1"
T0 = time.monotonic()


def emit(ev: str, **kw: object) -> None:
    print(json.dumps({"ev": ev, "t": round(time.monotonic() - T0, 3), **kw}), flush=True)


async def main(a: argparse.Namespace) -> None:
    logging.basicConfig(level=a.log, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    cfg = NodeConfig(listen=[a.listen], bootstrap=a.bootstrap, announce=a.announce, dial_timeout=10)
    ncfg = nat.NatConfig(reachability=a.reachability)
    table: dict[str, list[str]] = {}
    kinds: dict[str, str | None] = {}
    answered: set[str] = set()
    async with open_node(cfg) as node, trio.open_nursery() as nursery:
        svc: nat.NatService = await nursery.start(nat.run_nat_services, node, ncfg)
        emit("up", id=node.peer_id, addrs=node.addrs())

        async def echo(fs, remote):  # type: ignore[no-untyped-def]
            frame = await fs.recv(timeout=10)
            await fs.send("pong", {"got": frame.type, "from": node.peer_id})

        node.set_stream_handler(ECHO, echo)

        async def watch_nat() -> None:
            last = None
            while True:
                st = (svc.reachability.value, tuple(svc.advertised_addrs()))
                if st != last:
                    emit("reachability", value=st[0])
                    emit("advertised", addrs=list(st[1]))
                    last = st
                with trio.move_on_after(1):
                    await svc.wait_changed()

        disc = Discovery(node, "nat-test-model-hash", lambda: dict(
            model_name="nat-test", span_start=0, span_end=0, total_layers=1, version="nat-test"), period=1.0)
        await nursery.start(disc.run)

        async def watch_table() -> None:
            while True:
                snap = {r.peer_id: list(r.addrs) for r in disc.snapshot() if r.peer_id != node.peer_id}
                if snap != table:
                    grew = set(snap) != set(table)
                    table.clear()
                    table.update(snap)
                    if grew:
                        emit("table", peers=sorted(table))
                await trio.sleep(0.1)

        async def probe(pid: str) -> None:
            while pid not in answered:
                t1 = time.monotonic()
                try:
                    fs = await node.open_stream(pid, ECHO, table.get(pid, []), timeout=15)
                    try:
                        await fs.send("ping")
                        reply = await fs.recv(timeout=10)
                    finally:
                        await fs.close()
                    answered.add(pid)
                    emit("stream", peer=pid, kind=svc.connection_kind(_pid(pid)),
                         dt=round(time.monotonic() - t1, 3), reply=reply.type)
                except Exception as e:
                    emit("stream-error", peer=pid, error=f"{type(e).__name__}: {e}"[:3000])
                    await trio.sleep(1)

        def _pid(s: str):  # type: ignore[no-untyped-def]
            from libp2p.peer.id import ID

            return ID.from_base58(s)

        async def watch_kinds() -> None:
            while True:
                for pid in list(table):
                    k = svc.connection_kind(_pid(pid))
                    if kinds.get(pid) != k:
                        kinds[pid] = k
                        emit("kind", peer=pid, kind=k)
                await trio.sleep(0.1)

        nursery.start_soon(watch_nat)
        nursery.start_soon(watch_table)
        nursery.start_soon(watch_kinds)
        probing: set[str] = set()
        bootstrap_ids = {b.rsplit("/p2p/", 1)[-1] for b in a.bootstrap}
        settled_at: float | None = None
        with trio.move_on_after(a.lifetime):
            while True:
                for pid in list(table):
                    if pid not in probing and pid not in bootstrap_ids and (not a.one_sided or pid > node.peer_id):
                        probing.add(pid)
                        nursery.start_soon(probe, pid)
                targets = [p for p in table if p not in bootstrap_ids]
                if a.expect and len([p for p in targets if p in answered]) >= a.expect:
                    settled_at = settled_at or time.monotonic()
                    all_direct = all(kinds.get(p) == "direct" for p in targets)
                    if all_direct or time.monotonic() - settled_at > a.settle:
                        break
                await trio.sleep(0.1)
        # final check: a stream still works on whatever connection we ended with
        final = {}
        for pid in sorted((set(table) | answered) - bootstrap_ids):
            try:
                with trio.fail_after(10):
                    fs = await node.open_stream(pid, ECHO, table.get(pid, []), timeout=10)
                    await fs.send("ping")
                    await fs.recv(timeout=10)
                    await fs.close()
                final[pid] = svc.connection_kind(_pid(pid))
            except Exception as e:
                final[pid] = f"error: {type(e).__name__}: {e}"[:200]
        emit("done", table=sorted(table), kinds={p: svc.connection_kind(_pid(p)) for p in table},
             final=final, status=svc.status())
        await trio.sleep(a.linger)  # keep serving: the other peer may still run its final check
        nursery.cancel_scope.cancel()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True)
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--announce", action="append", default=[])
    p.add_argument("--reachability", default="auto")
    p.add_argument("--expect", type=int, default=0, help="non-bootstrap peers to reach before settling")
    p.add_argument("--settle", type=float, default=10.0)
    p.add_argument("--lifetime", type=float, default=40.0)
    p.add_argument("--linger", type=float, default=4.0, help="seconds to keep serving after 'done'")
    p.add_argument("--log", default="WARNING")
    p.add_argument("--one-sided", action="store_true", help="only the peer with the smaller id opens streams")
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse())
