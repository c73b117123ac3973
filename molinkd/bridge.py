"""Bridges between vLLM processes (plain framed sockets) and libp2p streams owned by the daemon.

vLLM code runs in its own processes with no trio loop and no libp2p; it speaks frames over
sockets (:mod:`molinkd.engine.link`). The daemon joins the two worlds:

- **dial socket** (a Unix socket per daemon): an engine process connects, sends
  ``p2p.dial {"peer", "proto"}``, gets ``p2p.dial_ok {}`` (or ``p2p.dial_err {"message"}``), and
  from then on the connection is a byte pipe to a libp2p stream to that peer. An address
  ``p2p:<peer id>`` in a route means exactly this (see ``link.FramedLink.connect``).
- **stage protocol** ``/molink/stage/1``: an incoming libp2p stream whose first frame is an
  admitted session hello/open (:mod:`molinkd.engine.admission`: the opener is the route's previous
  hop, the route is ours, its addresses are peer ids) is piped to the local stage process's socket,
  preceded by ``p2p.from {peer}``. The daemon learns which head the stage serves from it, so it
  can announce it (one head per stage at a time).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Awaitable, Callable

import trio

from molinkd import logs
from molinkd.engine.admission import AdmissionError, Admitted
from molinkd.engine.link import P2P_DIAL as DIAL  # one definition of the local protocol
from molinkd.engine.link import P2P_DIAL_OK as DIAL_OK
from molinkd.engine.link import P2P_FROM as FROM
from molinkd.engine.link import P2P_ROUTE as ROUTE
from molinkd.engine.link import P2P_ROUTE_ERR as ROUTE_ERR
from molinkd.engine.link import P2P_ROUTE_OK as ROUTE_OK
from molinkd.engine.link import P2P_AUDIT as AUDIT
from molinkd.engine.link import P2P_AUDIT_OK as AUDIT_OK
from molinkd.engine.link import P2P_VERIFIERS as VERIFIERS
from molinkd.engine.link import STAGE_PROTOCOL
from molinkd.engine.wire import HELLO, OPEN
from molinkd.limits import CONTROL_MSG
from p2p.framing import FrameError, encode_frame
from p2p.streams import FramedStream, StreamClosed

log = logging.getLogger("molinkd.bridge")

DIAL_ERR = "p2p.dial_err"
# A head probes a stage before routing through it; the stage's daemon answers from what it knows.
PROBE, INFO = "stage.probe", "stage.info"
CHUNK = 1 << 18


class _TrioRaw:
    """read/write/close over a trio stream (the interface FramedStream and _pump expect)."""

    def __init__(self, s: trio.abc.Stream) -> None:
        self.s = s

    async def read(self, n: int = CHUNK) -> bytes:
        return await self.s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.s.send_all(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.s.aclose()


async def _pump(src: Any, dst: Any, label: str) -> None:
    """Copy bytes until EOF or error on either side."""
    try:
        while True:
            data = await src.read(CHUNK)
            if not data:
                return
            await dst.write(data)
    except Exception as e:  # resets, EOF exceptions, broken pipes: all end the pipe
        log.debug("pipe %s ended: %s: %s", label, type(e).__name__, e)


async def pipe(a: Any, b: Any, label: str = "") -> None:
    """Bidirectional byte pipe; when either direction ends, both sides are closed."""
    async with trio.open_nursery() as nursery:
        async def one(src: Any, dst: Any, tag: str) -> None:
            await _pump(src, dst, tag)
            nursery.cancel_scope.cancel()

        nursery.start_soon(one, a, b, f"{label}>")
        nursery.start_soon(one, b, a, f"{label}<")
    for s in (a, b):
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await s.close()


async def serve_dial_socket(node: Any, path: str, *, allowed_protocols: set[str],
                            may_dial: Callable[[str, int, int], str | None],
                            plan_route: Callable[[list[str], list[str]], Awaitable[list[dict]]] | None = None,
                            pipes: set[trio.CancelScope] | None = None,
                            plan_verifiers: Callable[[list[str]], Awaitable[list[dict]]] | None = None,
                            on_audit: Callable[[dict], dict] | None = None,
                            task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on Unix socket ``path`` for engine processes that want a libp2p stream.

    A request names the peer and the layer span it must serve; ``may_dial(peer, start, end)``
    returns None to allow it, or the reason to refuse (the peer is not announcing that span for
    our model): engine processes relay routes that came off the network, so the daemon only dials
    peers the swarm shows serving the span asked for.

    A head's engine may instead ask for a new route (``p2p.route {"exclude", "avoid"}``, see
    :mod:`molinkd.engine.link`): ``plan_route(exclude, avoid)`` returns it or raises with the
    reason (answered as ``p2p.route_err``). Each open pipe's cancel scope is in ``pipes`` while it
    runs: cancelling them cuts the engine's streams (it then sees its pipeline broken).

    Audits (:mod:`molinkd.engine.audit`): ``p2p.verifiers {"exclude"}`` is answered like a route
    request with ``plan_verifiers(exclude)``; ``p2p.audit {...}`` with ``p2p.audit_ok
    on_audit(body)`` (the body checked by :func:`check_audit_report` first)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)

    async def handle(conn: trio.SocketStream) -> None:
        try:
            await _dial_for(conn)
        except Exception as e:  # a local process dying mid-dial must never take the daemon down
            log.info("dial socket connection ended: %s: %s", type(e).__name__, e)
            with contextlib.suppress(Exception):
                await conn.aclose()

    async def _dial_for(conn: trio.SocketStream) -> None:
        raw = _TrioRaw(conn)
        local = FramedStream(raw, peer="engine", limits=CONTROL_MSG)
        try:
            frame = await local.recv(timeout=10)
            if frame.type == ROUTE and plan_route is not None:
                await _answer_route(local, raw, frame.body)
                return
            if frame.type == VERIFIERS and plan_verifiers is not None:
                await _answer_verifiers(local, raw, frame.body)
                return
            if frame.type == AUDIT and on_audit is not None:
                try:
                    answer = on_audit(check_audit_report(frame.body))
                except ValueError as e:
                    answer = {"ban": [], "avoid": [], "error": str(e)[:300]}
                with contextlib.suppress(Exception):
                    await local.send(AUDIT_OK, answer)
                await raw.close()
                return
            if frame.type != DIAL:
                raise FrameError(f"expected {DIAL}, got {frame.type}")
            peer, proto = frame.get("peer"), frame.get("proto")
            start, end = frame.get("start"), frame.get("end")
            if (not isinstance(peer, str) or proto not in allowed_protocols or not _is_int(start)
                    or not _is_int(end)):
                raise FrameError(f"bad dial request {str(frame.body)[:200]}")
        except (FrameError, StreamClosed, trio.TooSlowError) as e:
            log.warning("dial socket: dropping a local connection: %s", e)
            await raw.close()
            return
        refusal = may_dial(peer, start, end)
        if refusal is not None:
            log.warning("dial socket: refusing to dial %s: %s", peer[:16], refusal)
            with contextlib.suppress(Exception):
                await local.send(DIAL_ERR, {"message": f"will not dial {peer[:16]}: {refusal}"})
            await raw.close()
            return
        try:
            remote = await node.open_stream(peer, proto, timeout=15)
        except Exception as e:
            with contextlib.suppress(Exception):
                await local.send(DIAL_ERR, {"message": f"cannot reach {peer}: {e}"})
            await raw.close()
            return
        try:
            await local.send(DIAL_OK, {})
        except Exception:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await remote.close()
            raise
        with trio.CancelScope() as scope:
            if pipes is not None:
                pipes.add(scope)
            try:
                await pipe(raw, remote.raw, f"dial:{peer[:8]}")
            finally:
                if pipes is not None:
                    pipes.discard(scope)
        if scope.cancelled_caught:
            for s in (raw, remote.raw):
                with trio.CancelScope(shield=True), trio.move_on_after(5), contextlib.suppress(Exception):
                    await s.close()

    def _peer_lists(body: Any, *keys: str) -> list[list[str]]:
        """The peer-id lists ``keys`` of a planner request (bounded; missing ones are empty)."""
        body = body if isinstance(body, dict) else {}
        lists = [body.get(k, []) for k in keys]
        if not all(isinstance(x, list) and len(x) <= 64 and all(isinstance(p, str) for p in x) for x in lists):
            raise ValueError(f"{'/'.join(keys)} must be lists of peer ids")
        return lists

    async def _answer_planner(local: FramedStream, raw: _TrioRaw, plan: Any) -> None:
        """Answer a route request with ``await plan()``: the route, or why there is none."""
        try:
            route = await plan()
        except Exception as e:
            with contextlib.suppress(Exception):
                await local.send(ROUTE_ERR, {"message": str(e)[:1000]})
        else:
            with contextlib.suppress(Exception):
                await local.send(ROUTE_OK, {"route": route})
        await raw.close()

    async def _answer_route(local: FramedStream, raw: _TrioRaw, body: Any) -> None:
        async def plan() -> Any:
            exclude, avoid = _peer_lists(body, "exclude", "avoid")
            return await plan_route(exclude, avoid)  # type: ignore[misc]

        await _answer_planner(local, raw, plan)

    async def _answer_verifiers(local: FramedStream, raw: _TrioRaw, body: Any) -> None:
        async def plan() -> Any:
            (exclude,) = _peer_lists(body, "exclude")
            return await plan_verifiers(exclude)  # type: ignore[misc]

        await _answer_planner(local, raw, plan)

    async with listener:
        task_status.started(path)
        await trio.serve_listeners(handle, [listener])


AUDIT_OUTCOMES = ("agree", "disagree", "skipped")


def check_audit_report(body: Any) -> dict:
    """A ``p2p.audit`` body from a local engine: outcome, peer-id lists, a bounded detail string."""
    if not isinstance(body, dict) or body.get("outcome") not in AUDIT_OUTCOMES:
        raise ValueError(f"an audit report needs an outcome in {AUDIT_OUTCOMES}")
    for k in ("blamed", "verifiers"):
        v = body.get(k)
        if not (isinstance(v, list) and len(v) <= 64 and all(isinstance(p, str) and 0 < len(p) <= 128 for p in v)):
            raise ValueError(f"an audit report's {k} must be a list of peer ids")
    if body["outcome"] == "disagree" and not (body["blamed"] and body["verifiers"]):
        raise ValueError("a disagreement names the blamed stages and the verifier route")
    detail = body.get("detail")
    return {"outcome": body["outcome"], "blamed": list(body["blamed"]), "verifiers": list(body["verifiers"]),
            "detail": detail[:500] if isinstance(detail, str) else ""}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stage_stream_handler(local_addr_fn: Callable[[], str | None], admit_fn: Callable[[Any, str], Admitted],
                         on_session: Callable[[Admitted, str], bool], on_end: Callable[[str], None],
                         info_fn: Callable[[], dict]):
    """A ``/molink/stage/1`` handler piping admitted sessions to the local stage process.

    The first frame must be a ``stage.probe`` (answered here) or a session hello/open.
    ``admit_fn(body, remote)`` checks the session against this stage and the authenticated peer
    that opened the stream (see :mod:`molinkd.engine.admission`; raises AdmissionError): a refused
    session changes nothing. ``local_addr_fn()`` returns ``unix:/path`` of the stage process (None
    while it loads); ``on_session(admitted, upstream)`` returns False to refuse (the stage serves
    another head); ``on_end(upstream)`` pairs with every accepted session. The stage process gets a
    ``p2p.from {peer}`` frame first, so it checks every later frame of the session itself.
    """

    async def handler(stream: FramedStream, remote: str) -> None:
        try:
            first = await stream.recv(timeout=30)
        except (StreamClosed, FrameError, trio.TooSlowError) as e:
            log.info("stage stream from %s dropped before its hello: %s", remote, e)
            return
        if first.type == PROBE:
            with trio.move_on_after(5):
                await stream.send(INFO, info_fn())
            return
        if first.type not in (HELLO, OPEN):
            await _reject(stream, f"a stage stream starts with {PROBE}, {HELLO} or {OPEN}, not {first.type[:40]!r}")
            return
        try:
            admitted = admit_fn(first.body, remote)
        except AdmissionError as e:
            log.warning("refused a stage session", extra=logs.kv(peer=remote, reason=str(e)))
            await _reject(stream, f"session refused: {e}")
            return
        addr = local_addr_fn()
        if not addr or not addr.startswith("unix:"):
            await _reject(stream, "this stage's engine is not ready")
            return
        if not on_session(admitted, remote):
            await _reject(stream, "this stage is serving another head; route around it")
            return
        try:
            conn = await trio.open_unix_socket(addr[5:])
        except OSError as e:
            on_end(remote)
            await _reject(stream, f"the stage process is unreachable: {e}")
            return
        local = _TrioRaw(conn)
        try:
            await local.write(encode_frame(FROM, {"peer": remote}))
            await local.write(encode_frame(first.type, first.body))
            leftover = stream.take_unparsed()  # bytes read past the hello must not be lost
            if leftover:
                await local.write(leftover)
            await pipe(stream.raw, local, f"stage:{remote[:8]}")
        finally:
            on_end(remote)

    return handler


async def probe_stage(node: Any, peer: str, timeout: float = 5.0) -> dict:
    """Ask a stage's daemon what it serves. Raises ValueError/ConnectionError with the reason."""
    stream = await node.open_stream(peer, STAGE_PROTOCOL, timeout=timeout)
    stream.limits = CONTROL_MSG  # a probe's answer is small: refuse anything bigger
    try:
        await stream.send(PROBE, {})
        frame = await stream.recv(timeout=timeout)
    except trio.TooSlowError:
        raise ConnectionError(f"no answer to a probe within {timeout}s") from None
    except (StreamClosed, FrameError) as e:
        raise ValueError(f"bad answer to a probe: {e}") from None
    finally:
        await stream.close()
    if frame.type != INFO or not isinstance(frame.body, dict):
        raise ValueError(f"answered a probe with {frame.type!r}")
    return frame.body


async def _reject(stream: FramedStream, message: str) -> None:
    with contextlib.suppress(Exception):
        with trio.move_on_after(5):
            await stream.send("eng.error", {"step": -1, "stage": -1, "message": message})
