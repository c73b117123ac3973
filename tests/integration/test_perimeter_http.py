"""HTTP connection limits with the real app on real hypercorn (in this process, 127.0.0.0/8 only):
idle and trickling connections from one address neither exhaust the server nor stay forever, while a
request from another address is answered."""

from __future__ import annotations

import json

import pytest
import trio

from molinkd import api

ATTACKER_IP = "127.0.0.2"  # loopback is a /8: a second client address without any network setup


async def start_server(nursery: trio.Nursery, **cap_kw) -> tuple[int, api.ConnectionCap]:
    async def status() -> dict:
        return {"model": {"name": "test"}}

    app = api.create_app(lambda: None, status)
    cap = api.ConnectionCap(**cap_kw)
    urls = await nursery.start(lambda task_status: api.serve_http(app, "127.0.0.1:0", cap=cap,
                                                                  task_status=task_status))
    return int(urls[0].rsplit(":", 1)[1]), cap


async def connect(port: int, src: str = ATTACKER_IP) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((src, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def get_health(port: int, src: str = "127.0.0.1") -> tuple[int, dict]:
    s = await connect(port, src)
    try:
        await s.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
                chunk = await s.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        await s.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def closed_by_server(s: trio.SocketStream, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        try:
            while await s.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


async def test_idle_connection_flood_does_not_block_other_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "IDLE_TIMEOUT", 2.0)
    async with trio.open_nursery() as n:
        port, cap = await start_server(n, total=1024, per_ip=64)
        idle = [await connect(port) for _ in range(200)]
        # past the per-address cap, connections get a 503 and are closed at once
        await trio.sleep(0.5)
        assert cap.refused >= 200 - 64
        assert cap.open.get(ATTACKER_IP, 0) <= 64
        # another client is served meanwhile
        assert await get_health(port) == (200, {"status": "ok"})
        # the same address gets the clear error, not a hang
        status, body = await get_health(port, ATTACKER_IP)
        assert status == 503 and body["error"]["message"].startswith("too many open connections")
        # idle connections are closed by the server after IDLE_TIMEOUT (the test would hang otherwise)
        for s in idle[:5]:
            assert await closed_by_server(s, 10)
        for s in idle:
            await s.aclose()
        n.cancel_scope.cancel()


async def test_header_trickler_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slowloris: a request whose headers never complete does not hold its connection for ever."""
    monkeypatch.setattr(api, "IDLE_TIMEOUT", 2.0)
    async with trio.open_nursery() as n:
        port, _ = await start_server(n)
        s = await connect(port)
        await s.send_all(b"GET /health HTTP/1.1\r\n")
        t0 = trio.current_time()
        closed = False
        with trio.move_on_after(15):
            try:
                for i in range(100):
                    await s.send_all(b"X-Slow-%d: y\r\n" % i)
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed = True
        assert closed and trio.current_time() - t0 < 10
        assert await get_health(port) == (200, {"status": "ok"})
        n.cancel_scope.cancel()


async def test_total_connection_cap() -> None:
    async with trio.open_nursery() as n:
        port, cap = await start_server(n, total=20, per_ip=1000)
        held = [await connect(port) for _ in range(30)]
        await trio.sleep(0.5)
        assert cap.count == 20 and cap.refused >= 10
        for s in held:
            await s.aclose()
        # slots come back as soon as clients leave (hypercorn alone would hold them IDLE_TIMEOUT longer)
        with trio.fail_after(5):
            while cap.count:
                await trio.sleep(0.05)
        assert await get_health(port) == (200, {"status": "ok"})
        n.cancel_scope.cancel()


def test_connection_cap_bookkeeping() -> None:
    cap = api.ConnectionCap(total=3, per_ip=2)
    assert cap.enter("a") and cap.enter("a") and not cap.enter("a")
    assert cap.enter("b") and not cap.enter("c")  # total reached
    cap.leave("a")
    assert cap.enter("c") and cap.count == 3 and cap.refused == 2
