"""A small synchronous framed socket link (blocking sockets with deadlines, :mod:`p2p.framing`).

Used inside vLLM processes (EngineCore threads, stage workers), where there is no trio loop.
Addresses are opaque strings: ``tcp:HOST:PORT`` or ``unix:/path`` (the daemon may later hand out
Unix paths that it bridges to libp2p streams).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from p2p.framing import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame

# the daemon's dial socket protocol (molinkd.bridge owns the other side)
P2P_DIAL, P2P_DIAL_OK = "p2p.dial", "p2p.dial_ok"
# first frame the daemon writes to its stage process for each incoming stream: {"peer": the
# authenticated libp2p peer id that opened it}; the stage process checks every session against it
P2P_FROM = "p2p.from"
# an engine process asks its daemon for a new route: {"exclude": [peer ids never to use], "avoid":
# [peer ids to use only if nothing else covers their layers]} -> p2p.route_ok {"route": [hops]} or
# p2p.route_err {"message"} (the daemon keeps the route it gave as the one in use)
P2P_ROUTE, P2P_ROUTE_OK, P2P_ROUTE_ERR = "p2p.route", "p2p.route_ok", "p2p.route_err"
# audits (molinkd.engine.audit): a head's engine asks its daemon for a verifier route,
# {"exclude": [the route's remote peers]} -> p2p.route_ok / p2p.route_err as above (not taken as the
# route in use), and reports each audit, {"outcome", "blamed", "verifiers", "detail"} ->
# p2p.audit_ok {"ban": [peer ids], "avoid": [peer ids]} (whom the engine must fail over away from)
P2P_VERIFIERS = "p2p.verifiers"
P2P_AUDIT, P2P_AUDIT_OK = "p2p.audit", "p2p.audit_ok"
STAGE_PROTOCOL = "/molink/stage/1"


class LinkClosed(ConnectionError):
    """The other side closed the connection (or died) between frames."""


class LinkTimeout(TimeoutError):
    """No complete frame arrived before the deadline."""


def _family_addr(addr: str) -> tuple[int, Any]:
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[5:]
    if addr.startswith("tcp:"):
        host, _, port = addr[4:].rpartition(":")
        return socket.AF_INET, (host or "127.0.0.1", int(port))
    raise ValueError(f"address {addr!r} must be tcp:HOST:PORT or unix:/path")


class FramedLink:
    """Frames over one connected socket. ``send`` is thread-safe; ``recv`` is for one reader."""

    def __init__(self, sock: socket.socket, *, max_frame: int = DEFAULT_MAX_FRAME, peer: str = "?") -> None:
        self.sock = sock
        self.peer = peer
        self._decoder = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._send_lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, addr: str, *, timeout: float = 10.0, span: tuple[int, int] | None = None,
                **kw: Any) -> FramedLink:
        """Connect to ``addr``. For ``p2p:<peer id>``, ``span`` is the layer span that peer must be
        announcing: the daemon dials only peers the swarm shows serving it."""
        if addr.startswith("p2p:"):
            if span is None:
                raise ValueError("dialing a peer needs the span it must serve")
            return cls._connect_p2p(addr[4:], span, timeout=timeout, **kw)
        fam, a = _family_addr(addr)
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                s.connect(a)
                return cls(s, peer=addr, **kw)
            except OSError:
                s.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    @classmethod
    def _connect_p2p(cls, peer_id: str, span: tuple[int, int], *, timeout: float, **kw: Any) -> FramedLink:
        """``p2p:<peer id>``: ask this machine's daemon (its dial socket, ``$MOLINK_P2P_DIAL``) for a
        libp2p stream to that peer's stage protocol; the connection then carries it byte for byte."""
        dial = os.environ.get("MOLINK_P2P_DIAL")
        if not dial:
            raise LinkClosed(f"cannot reach p2p:{peer_id}: MOLINK_P2P_DIAL is not set (run under molinkd)")
        link = cls.connect(f"unix:{dial}", timeout=timeout, **kw)
        link.peer = f"p2p:{peer_id}"
        try:
            link.send(P2P_DIAL, {"peer": peer_id, "proto": STAGE_PROTOCOL, "start": span[0], "end": span[1]},
                      timeout=timeout)
            reply = link.recv(timeout=timeout + 5)
        except Exception:
            link.close()
            raise
        if reply.type != P2P_DIAL_OK:
            link.close()
            msg = reply.body.get("message") if isinstance(reply.body, dict) else reply.body
            raise LinkClosed(f"the daemon could not open a stream to {peer_id}: {msg}")
        return link

    def send(self, msg_type: str, body: Any = None, *, timeout: float = 60.0) -> None:
        data = encode_frame(msg_type, body, max_size=self._max_frame)
        with self._send_lock:
            self.sock.settimeout(timeout)
            try:
                self.sock.sendall(data)
            except TimeoutError:
                raise LinkTimeout(f"sending {msg_type} to {self.peer} took over {timeout}s") from None
            except OSError as e:
                raise LinkClosed(f"connection to {self.peer} lost while sending {msg_type}: {e}") from None
            self.bytes_out += len(data)

    def recv(self, timeout: float | None) -> Frame:
        """Next frame; raises LinkTimeout past ``timeout`` s, LinkClosed at end of stream,
        FrameError on a malformed frame. A timeout leaves any partial frame buffered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            f = self._decoder.next_frame()
            if f is not None:
                return f
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkTimeout(f"no frame from {self.peer} within {timeout}s")
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                raise LinkClosed(f"connection to {self.peer} lost: {e}") from None
            if not chunk:
                raise LinkClosed(f"{self.peer} closed the connection")
            self.bytes_in += len(chunk)
            self._decoder.feed(chunk)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def recv_within(link: FramedLink, timeout: float, want: Callable[[Frame], bool], *, error_type: str = "eng.error") -> Frame:
    """The first frame ``want`` accepts, or the first frame of ``error_type``, skipping others,
    within ``timeout`` s in all (raises LinkTimeout past it; LinkClosed as :meth:`FramedLink.recv`).
    The caller tells the two outcomes apart by ``frame.type``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LinkTimeout(f"no expected frame from {link.peer} within {timeout:.0f}s")
        f = link.recv(timeout=left)
        if f.type == error_type or want(f):
            return f


def ask_daemon(t: str, body: dict, timeout: float, *, connect_timeout: float = 10.0) -> Frame:
    """One request on the daemon's dial socket ($MOLINK_P2P_DIAL) and its reply frame (an engine
    process asking for a route, a verifier route, or reporting an audit). OSError without a daemon."""
    dial = os.environ.get("MOLINK_P2P_DIAL")
    if not dial:
        raise OSError("not running under a daemon (MOLINK_P2P_DIAL unset)")
    link = FramedLink.connect(f"unix:{dial}", timeout=connect_timeout)
    try:
        link.send(t, body, timeout=connect_timeout)
        return link.recv(timeout=timeout)
    finally:
        link.close()


def listen(addr: str, backlog: int = 4) -> socket.socket:
    """A listening socket on ``addr`` (a stale Unix socket file is replaced)."""
    fam, a = _family_addr(addr)
    s = socket.socket(fam, socket.SOCK_STREAM)
    if fam == socket.AF_UNIX:
        if os.path.exists(a):
            os.unlink(a)
    else:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(a)
    s.listen(backlog)
    return s


def bound_addr(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return f"tcp:{name[0]}:{name[1]}"
