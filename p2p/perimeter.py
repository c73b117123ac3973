"""The host's perimeter: what a peer (whose id costs nothing) may do to us, bounded per peer.

Used by :mod:`p2p.host` (import that module, not this one: it configures libp2p's logging first):

- key files read with ``O_NOFOLLOW`` (:func:`read_key_file`), the ``--allow-peers`` file
  (:func:`read_allow_peers`), the identity lock (:class:`IdentityLock`);
- :class:`PeerResources`: per-peer inbound stream caps and the allow list, before protocol negotiation;
- :class:`BoundedYamux`: closes a peer's connection when its unread bytes pass a cap (py-libp2p's yamux
  buffers past its own window without bound);
- :class:`GatedPubsub`: per-forwarder message rate before signature checks;
- :class:`AllowNotifee`: closes connections of peers not allowed (py-libp2p gates by IP only);
- :class:`TokenBucket`, :class:`RateLimitedLog`: the small tools the above use.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INotifee
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub
from libp2p.rcmgr import Direction
from libp2p.rcmgr.manager import ResourceManager
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from p2p.host import Node, NodeConfig

log = logging.getLogger("p2p.host")


class AllowListError(ValueError):
    """The ``--allow-peers`` file cannot be read or holds something that is not a peer id."""


class IdentityInUse(RuntimeError):
    """Another running daemon holds this identity file (two daemons would be one peer id)."""


def read_key_file(path: Path, what: str, max_bytes: int = 1 << 20) -> bytes:
    """Read a key file without following a symlink at its last component (``O_NOFOLLOW``).

    Raises OSError (with the fix in the message for a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, f"{what} {path} is a symlink; key files are not read through symlinks: "
                                   "point the flag at the real file") from None
        raise
    try:
        data = b""
        while len(data) <= max_bytes:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk
        raise OSError(errno.EFBIG, f"{what} {path} is larger than {max_bytes} bytes: not a key file")
    finally:
        os.close(fd)


class IdentityLock:
    """An exclusive ``flock`` on ``<identity>.lock`` held while a node runs, with the holder's pid
    written in it: a second daemon started with the same identity is refused with
    :class:`IdentityInUse` naming that pid (two processes with one peer id never see each other)."""

    def __init__(self, identity: Path) -> None:
        self.path = Path(identity).with_name(Path(identity).name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> IdentityLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            ident = self.path.with_name(self.path.name[: -len(".lock")])
            raise IdentityInUse(
                f"identity {ident} is in use by another molinkd (pid {holder}); two daemons with one "
                f"identity are one peer id and never see each other. Give this one its own: "
                f"--identity {ident.with_name('identity-2.key')}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def is_peer_id(text: str) -> bool:
    """Whether ``text`` is a base58 libp2p peer id: a multihash, identity-coded (``12D3KooW...``,
    inlined Ed25519 keys) or sha2-256 (``Qm...``)."""
    try:
        raw = ID.from_base58(text).to_bytes()
    except Exception:
        return False
    if len(raw) < 2 or len(text) > 128:
        return False
    code, size = raw[0], raw[1]
    return (code == 0x00 and size == len(raw) - 2 and size >= 32) or (code == 0x12 and size == 32 and len(raw) == 34)


def read_allow_peers(path: Path) -> frozenset[str]:
    """Peer ids from an allow-list file: one per line, ``#`` starts a comment, blank lines ignored.

    Raises AllowListError naming the line of anything that is not a peer id (a typo would otherwise
    lock a peer out silently) or if the file lists nobody."""
    try:
        text = read_key_file(Path(path), "allow-peers file").decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AllowListError(f"cannot read the allow-peers file {path}: {getattr(e, 'strerror', None) or e}") from None
    out: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if is_peer_id(word):
            out.add(word)
        else:
            raise AllowListError(f"{path}:{n}: {word[:80]!r} is not a peer id (one peer id per line, "
                                 "as the peer prints it at start)") from None
    if not out:
        raise AllowListError(f"{path}: lists no peer id; with --allow-peers, no peer could connect")
    return frozenset(out)




class TokenBucket:
    """Per-key token buckets (``rate`` per second, ``burst`` deep); memory bounded by ``max_keys``."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            return False
        if len(self._state) >= self.max_keys and key not in self._state:
            # forget the fullest buckets (idle keys): they would be full again anyway
            for k in [k for k, (t, _) in self._state.items() if t >= self.burst - 1][: self.max_keys // 2]:
                del self._state[k]
        self._state[key] = (tokens - 1.0, now)
        return True


limit_log = RateLimitedLog(log)


class PeerResources(ResourceManager):
    """py-libp2p's resource manager with per-peer inbound stream caps and the allow list.

    ``acquire_stream`` runs when the muxer hands over a new inbound stream, before any protocol
    negotiation: a refused stream is reset at once. (The library's own limit is global: one peer
    could take all 10000 slots, and its semaphore makes everyone else's streams queue.)"""

    def __init__(self, cfg: NodeConfig, allowed: Callable[[str], bool]) -> None:
        super().__init__(enable_metrics=False, enable_prometheus=False)
        self._per_peer = cfg.max_streams_per_peer
        self._allowed = allowed
        self.inbound: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()  # by reason

    def acquire_stream(self, peer_id: Any, direction: Any) -> bool:
        if direction == Direction.INBOUND:
            peer = str(peer_id)
            if not self._allowed(peer):
                self.refused["not_allowed"] += 1
                limit_log.warning(f"deny:{peer}", "refused a stream from %s: not in --allow-peers", peer)
                return False
            if self.inbound[peer] >= self._per_peer:
                self.refused["streams_per_peer"] += 1
                limit_log.warning(f"streams:{peer}", "peer %s has %d streams open (the limit): resetting its new "
                                   "ones", peer, self.inbound[peer])
                return False
            if not super().acquire_stream(peer_id, direction):
                self.refused["streams_total"] += 1
                return False
            self.inbound[peer] += 1
            return True
        return super().acquire_stream(peer_id, direction)

    def release_stream(self, peer_id: Any, direction: Any) -> None:
        super().release_stream(peer_id, direction)
        if direction == Direction.INBOUND:
            peer = str(peer_id)
            if self.inbound[peer] <= 1:
                self.inbound.pop(peer, None)
            else:
                self.inbound[peer] -= 1


class MeteredBuffer(bytearray):
    """A yamux stream's receive buffer that tells its connection when it grows."""

    __slots__ = ("_owner",)

    def extend(self, data: Any) -> None:  # type: ignore[override]
        super().extend(data)
        if len(self) > BoundedYamux.CHECK_ABOVE:
            self._owner.check_buffered()


class _Buffers(dict):
    """``Yamux.stream_buffers`` whose values are :class:`MeteredBuffer` (assigned by the library)."""

    def __init__(self, owner: BoundedYamux) -> None:
        super().__init__()
        self._owner = owner

    def __setitem__(self, key: Any, value: Any) -> None:
        buf = MeteredBuffer(value)
        buf._owner = self._owner
        super().__setitem__(key, buf)


class BoundedYamux(Yamux):
    """Yamux that closes the connection of a peer whose unread bytes exceed a cap.

    py-libp2p 0.8.1's yamux only logs "peer exceeded receive window" and keeps buffering, so a peer
    ignoring flow control could fill our memory. An honest peer stays within its windows (256 KiB
    growing to 16 MiB per stream). Cost: one length check per DATA frame; the sum over the
    connection's buffers only when one buffer holds more than CHECK_ABOVE bytes."""

    CHECK_ABOVE = 1 << 20
    max_buffered = 128 << 20  # set per host by open_node (a subclass per config)

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.stream_buffers = _Buffers(self)
        self.over_limit = False

    def check_buffered(self) -> None:
        total = sum(len(b) for b in list(self.stream_buffers.values()))
        if total > self.max_buffered and not self.over_limit:
            self.over_limit = True
            limit_log.warning(f"bytes:{self.peer_id}", "peer %s has %d unread bytes buffered (limit %d; it ignores "
                               "flow control): closing its connection", self.peer_id, total, self.max_buffered)
            self.event_shutting_down.set()  # handle_incoming stops at its next frame
            raise ConnectionResetError("peer exceeded the buffered-bytes limit")

    async def handle_incoming(self) -> None:
        await super().handle_incoming()
        if self.over_limit:
            await self._cleanup_on_error()


def use_bounded_yamux(host: Any, max_buffered: int) -> None:
    """Make the host's upgrader build :class:`BoundedYamux` connections (py-libp2p 0.8.1's muxer
    negotiation constructs ``Yamux`` by name, ignoring the class given in ``muxer_opt``)."""
    mm = host.get_network().upgrader.muxer_multistream
    bounded = type("BoundedYamux", (BoundedYamux,), {"max_buffered": max_buffered})

    async def new_conn(conn: Any, peer_id: ID) -> Any:
        protocol, transport_class = await mm._selector.select(conn, conn.is_initiator, mm.negotiate_timeout)
        if protocol == YAMUX_PROTOCOL_ID:
            async def on_close() -> None:
                pass

            muxed = bounded(conn, peer_id, is_initiator=conn.is_initiator, on_close=on_close)
        else:
            muxed = transport_class(conn, peer_id)
        return mm._annotate_connection(muxed, conn, protocol)

    mm.new_conn = new_conn


class GatedPubsub(Pubsub):
    """Pubsub that drops a forwarder's new messages over a per-second ceiling before the signature
    check and the validators (the expensive part of a flood)."""

    def __init__(self, *a: Any, forwarder_rate: float, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._fwd_bucket = TokenBucket(forwarder_rate, forwarder_rate)
        self.dropped_forwarder_rate = 0

    async def push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        if msg_forwarder != self.my_id and not self._is_msg_seen(msg):
            if not self._fwd_bucket.allow(str(msg_forwarder)):
                self.dropped_forwarder_rate += 1
                limit_log.warning(f"pubsub:{msg_forwarder}", "peer %s forwards pubsub messages faster than %.0f/s: "
                                   "dropping them", msg_forwarder, self._fwd_bucket.rate)
                return
        await super().push_msg(msg_forwarder, msg)


class AllowNotifee(INotifee):
    """Closes connections of peers that are not allowed (py-libp2p gates by IP only)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def connected(self, network: Any, conn: Any) -> None:
        try:
            peer = conn.muxed_conn.peer_id.to_base58()
        except Exception:
            return
        if not self.node.peer_allowed(peer):
            self.node.refused_connections += 1
            limit_log.warning(f"conn:{peer}", "closing the connection of %s: not in --allow-peers", peer)
            self.node._nursery.start_soon(close_quietly, conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


async def close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception), trio.move_on_after(5):
        await conn.close()
