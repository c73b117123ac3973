"""`molink bench` for real: the WAN link on loopback sockets, and one short end-to-end run of the
command (real daemons, real vLLM engines) whose last output line must be the JSON result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from molinkd.bench.wanlink import WanLink
from tests.helpers import REPO


async def _echo_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
    async def echo(s: trio.SocketStream) -> None:
        async with s:
            while data := await s.receive_some(1 << 16):
                await s.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def _through_link(rtt_ms: float, rate_mbit: float | None, payload: bytes, pings: int):
    """(ping-pong RTTs in s, echoed payload, seconds the payload took) through a WanLink."""
    async with trio.open_nursery() as n:
        port = await n.start(_echo_server)
        link = WanLink(("127.0.0.1", port), rtt_ms=rtt_ms, rate_mbit=rate_mbit)
        await n.start(link.run)
        with trio.fail_after(60):
            s = await trio.open_tcp_stream("127.0.0.1", link.port)
            rtts = []
            for i in range(pings):
                t0 = trio.current_time()
                await s.send_all(b"ping%d" % i)
                got = await s.receive_some(64)
                rtts.append(trio.current_time() - t0)
                assert got == b"ping%d" % i
            t0 = trio.current_time()
            received = bytearray()

            async def reader() -> None:
                while len(received) < len(payload):
                    received.extend(await s.receive_some(1 << 16))

            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                await s.send_all(payload)
            took = trio.current_time() - t0
            await s.aclose()
        assert link.connections == 1 and link.bytes_forwarded >= 2 * len(payload)
        n.cancel_scope.cancel()
    return rtts, bytes(received), took


def test_wanlink_delays_every_round_trip_and_keeps_the_bytes():
    payload = os.urandom(3 << 20)
    rtts, echoed, _ = trio.run(_through_link, 40.0, None, payload, 5)
    assert echoed == payload
    assert min(rtts) >= 0.040  # a delay line cannot deliver early; no upper bound asserted


def test_wanlink_rate_limits_both_directions():
    payload = os.urandom(1 << 20)  # 8 Mbit each way at 80 Mbit/s: >= 0.1 s per direction (they overlap)
    _, echoed, took = trio.run(_through_link, 0.0, 80.0, payload, 1)
    assert echoed == payload
    assert took >= 0.1


def test_wanlink_delay_changes_on_open_connections():
    async def main():
        async with trio.open_nursery() as n:
            port = await n.start(_echo_server)
            link = WanLink(("127.0.0.1", port))
            await n.start(link.run)
            s = await trio.open_tcp_stream("127.0.0.1", link.port)
            await s.send_all(b"x")
            assert await s.receive_some(8) == b"x"
            link.set(rtt_ms=60.0)
            t0 = trio.current_time()
            await s.send_all(b"y")
            assert await s.receive_some(8) == b"y"
            rtt = trio.current_time() - t0
            await s.aclose()
            n.cancel_scope.cancel()
        return rtt

    assert trio.run(main) >= 0.060


@pytest.mark.slow
def test_molink_bench_end_to_end_json_last_line():
    """Baseline + 2-stage swarm through a 20 ms link, tiny settings: the last line is the JSON
    result with every field, figures from this run, and no daemon is left running."""
    before = _molinkd_pids()
    # a daemon that never serves ends the bench with its status and log (before this test's deadline)
    env = dict(os.environ, PYTHONPATH=str(REPO), MOLINK_BENCH_READY_TIMEOUT="300")
    p = subprocess.Popen([sys.executable, "-m", "cli.molink", "bench", "--max-tokens", "8", "--batch", "1",
                          "--prompt-len", "8", "--rtt-ms", "20", "--json"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=480)
    except subprocess.TimeoutExpired:  # stop it as a user would (it stops its daemons) and show why
        p.terminate()
        out, err = p.communicate(timeout=120)
        pytest.fail(f"molink bench did not finish in 480 s:\n{err[-4000:]}")
    assert p.returncode == 0, err[-3000:]
    last = out.strip().splitlines()[-1]
    res = json.loads(last)
    for k in ("baseline_tok_s", "swarm_tok_s", "swarm_nodelay_tok_s", "ttft_ms_p50", "tpot_ms_p50",
              "inflight_batches", "stages", "batch", "rtt_ms"):
        assert k in res, k
    assert res["stages"] == 2 and res["batch"] == 1 and res["rtt_ms"] == 20
    assert res["baseline_tok_s"] > 0 and res["swarm_tok_s"] > 0 and res["swarm_nodelay_tok_s"] > 0
    assert res["inflight_batches"] >= 2
    assert res["spans"] == "0:15,15:30"
    if res["suggested_spans"]:  # (only when the head had both stages' step times to report)
        spans = [tuple(map(int, x.split(":"))) for x in res["suggested_spans"].split(",")]
        assert len(spans) == 2 and spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == 30, spans
    # the stages saw each other through the link (the bench checks >= 80% of the RTT asked)
    assert res["link_rtt_ms_seen"] and min(res["link_rtt_ms_seen"]) >= 16
    # a delayed step cannot be faster than the link's round trip
    assert res["tpot_ms_p50"] >= 20
    deadline = time.monotonic() + 30
    while _molinkd_pids() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (_molinkd_pids() - before), "molink bench left daemons running"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_bench_stops_every_daemon_and_removes_its_files(sig):
    before = _molinkd_pids()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # SIGINT as a user's Ctrl-C sees it: an ignored SIGINT of the test runner's worker would be
    # inherited (and Python installs no handler for an ignored signal)
    p = subprocess.Popen([sys.executable, "-m", "cli.molink", "bench", "--max-tokens", "8", "--batch", "1"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120

        def bench_daemons() -> set:
            # only the bench's own daemons (its work directory): tests running alongside start theirs
            return {pid for pid in _molinkd_pids() - before if any("/molink-bench-" in c for c in _cmdline(pid))}

        while not bench_daemons() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        started = bench_daemons()
        assert started, "molink bench started no daemon"
        workdirs = {c.split("/molink-bench-")[0] + "/molink-bench-" + c.split("/molink-bench-")[1].split("/")[0]
                    for pid in started for c in _cmdline(pid) if "/molink-bench-" in c}
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert not (_molinkd_pids() - before), "daemons left running after the interrupt"
    assert workdirs and not any(os.path.exists(w) for w in workdirs)


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _molinkd_pids() -> set[int]:
    import psutil

    out = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any("cli.molinkd" in c for c in cmd) and any("molink-bench-" in c for c in cmd):
            out.add(proc.info["pid"])
    return out


def test_node_ping_measures_one_round_trip_through_the_link():
    """Node.ping (what routes are planned with) through a 60 ms link: one round trip, not the two
    or three more that opening the ping stream costs."""
    from p2p.host import NodeConfig, open_node

    async def main() -> float:
        async with open_node(NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",))) as a, \
                open_node(NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",))) as b, trio.open_nursery() as n:
            port = int(next(x for x in a.addrs() if "/127.0.0.1/" in x).split("/tcp/")[1].split("/")[0])
            link = WanLink(("127.0.0.1", port), rtt_ms=60)
            await n.start(link.run)
            with trio.fail_after(60):
                await b.connect(a.peer_id, [f"{link.address}/p2p/{a.peer_id}"])
                rtts = [await b.ping(a.peer_id, timeout=10) for _ in range(3)]
            n.cancel_scope.cancel()
        return min(rtts)

    rtt = trio.run(main)
    assert 0.055 <= rtt < 0.115, rtt
