"""The libp2p host: identity, Noise-only security, yamux, optional swarm key, pubsub, dials.

This is the only module that imports libp2p (besides :mod:`p2p.nat` and :mod:`p2p.perimeter`).
Everything above it sees peer ids and multiaddrs as strings, streams as :class:`p2p.streams.FramedStream` and pubsub as
``bytes`` in / ``(bytes, source peer id)`` out, so protocol logic can be tested without libp2p.

Usage::

    async with open_node(NodeConfig(listen=["/ip4/0.0.0.0/tcp/4001"], identity_path=p)) as node:
        node.set_stream_handler("/molink/x/1", handler)
        fs = await node.open_stream(peer_id, "/molink/x/1", addrs)

py-libp2p 0.8.1 traps handled here (design.md section 6): the default security set includes
secio and plaintext (we pass Noise only); dials are slow with several connections per peer
(``max_connections_per_peer=1``); bootstrap peers are forgotten after 3 failures and failed peers
sit in a 60 s negative dial cache (we own the reconnect loop and evict the cache entry before each
attempt); a wrong swarm key stalls the handshake (bounded by ``handshake_timeout``); gossipsub's
per-forwarder rate limit of 10 msg/s would drop announcements in swarms over ~20 peers (raised);
importing libp2p makes its loggers print bare warnings (:func:`configure_libp2p_logging`).

Perimeter (a peer id costs nothing, so every limit is per peer; see :class:`NodeConfig`):

- ``allow_peers``: only listed peer ids may connect (a connection notifee closes the others, since
  py-libp2p gates by IP only), open streams (refused before protocol negotiation) or have pubsub
  messages delivered (checked on the signer in :meth:`Node.subscribe`). :meth:`Node.peer_allowed`.
- Streams: at most ``max_streams_per_peer`` inbound streams per peer are accepted by the muxer
  (counted before protocol negotiation: a flood of half-open streams is refused at once instead of
  queueing behind py-libp2p's global stream semaphore, which we disable), and at most
  ``max_streams_per_protocol`` concurrent handler runs per peer per protocol; excess streams are
  reset at once with a rate-limited log line.
- Bytes in flight: py-libp2p's yamux does not enforce its own receive window (a peer that ignores it
  is buffered without bound). :class:`BoundedYamux` closes the connection of a peer whose unread
  bytes exceed ``max_buffered_bytes_per_peer``.
- Pubsub: gossipsub's per-forwarder rate limit is back near its default
  (``gossip_max_msgs_per_second``); a forwarder over ``gossip_max_msgs_per_forwarder`` is dropped
  before any signature check, and each signer is held to ``gossip_source_rate`` messages/s
  (burst ``gossip_source_burst``) before the topic validator runs.
- Key files (identity, swarm key, allow list) are opened with ``O_NOFOLLOW``; an identity readable
  or writable by group/other is refused; the identity is locked (:class:`IdentityLock`) so two
  daemons cannot run as one peer id.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import random
import re
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import multiaddr
import trio

from p2p.streams import FramedStream

log = logging.getLogger(__name__)


class _ForwardToRoot(logging.Handler):
    """Pass libp2p records at or above this handler's level to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)  # the handler's own level already filtered it


def configure_libp2p_logging(level: int | None = None) -> None:
    """Make libp2p's loggers quiet by default and route them through the normal logging tree.

    On import, libp2p sets its ``libp2p`` logger to WARNING with no handler and no propagation,
    so Python's last-resort handler prints bare lines to stderr, and some of its modules set
    their own INFO levels. We stop propagation and attach one handler that forwards only
    records at ``level`` or above to the root logger's handlers. The default is CRITICAL (libp2p
    logs ordinary peer departures as multi-line ERRORs); set the environment variable
    ``MOLINK_LIBP2P_LOG`` (e.g. ``ERROR``, ``DEBUG``) to see more.
    """
    if level is None:
        named = logging.getLevelName(os.environ.get("MOLINK_LIBP2P_LOG", "CRITICAL").upper())
        level = named if isinstance(named, int) else logging.CRITICAL
    lg = logging.getLogger("libp2p")
    lg.handlers.clear()
    fwd = _ForwardToRoot()
    fwd.setLevel(level)
    lg.addHandler(fwd)
    lg.setLevel(level)
    lg.propagate = False


# Importing libp2p runs its setup_logging(); fix the result right after.
import libp2p  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair as _new_ed25519  # noqa: E402
from libp2p.crypto.keys import KeyPair  # noqa: E402
from libp2p.crypto.serialization import deserialize_private_key  # noqa: E402
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519  # noqa: E402
from libp2p.host.ping import PingService  # noqa: E402
from libp2p.network.config import ConnectionConfig  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr  # noqa: E402
from libp2p.pubsub.gossipsub import GossipSub  # noqa: E402
from libp2p.pubsub.pubsub import Pubsub  # noqa: E402
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID  # noqa: E402
from libp2p.security.noise.transport import Transport as NoiseTransport  # noqa: E402
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID  # noqa: E402
from libp2p.stream_muxer.yamux.yamux import Yamux  # noqa: E402
from libp2p.tools.anyio_service import background_trio_service  # noqa: E402

configure_libp2p_logging()

from p2p.perimeter import (  # noqa: E402  (after libp2p's logging is configured)
    AllowListError,
    AllowNotifee,
    GatedPubsub,
    IdentityInUse,
    IdentityLock,
    PeerResources,
    TokenBucket,
    limit_log,
    read_allow_peers,
    read_key_file,
    use_bounded_yamux,
)

GOSSIPSUB_PROTOCOLS = ["/meshsub/1.1.0", "/meshsub/1.0.0"]


class DialError(ConnectionError):
    """Could not reach a peer or open a stream to it (unreachable, refused, wrong swarm key,
    protocol not supported, or the deadline passed). The message says which peer and why."""


class IdentityError(RuntimeError):
    """The identity file exists but cannot be read as a libp2p private key."""


class SwarmKeyError(ValueError):
    """The swarm key file is not a valid 32-byte pre-shared key."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Everything the host needs. Addresses are multiaddr strings.

    ``listen``: where to listen (``/ip4/0.0.0.0/tcp/4001``; port 0 picks a free port).
    ``announce``: addresses to advertise first (e.g. a port forward), before the listen ones.
    ``bootstrap``: full multiaddrs with ``/p2p/<id>``, dialled and kept connected.
    ``identity_path``: Ed25519 key file, created (mode 0600) if missing; None = ephemeral.
    ``swarm_key_path``: optional pre-shared key (IPFS ``swarm.key`` format or 64 hex chars):
    only peers with the same key can connect.
    ``handshake_timeout``: bound on the security/muxer upgrade of a connection (a wrong swarm key
    shows up as a stalled handshake, so this is also how fast it is rejected).
    """

    listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/4001",)
    announce: Sequence[str] = ()
    bootstrap: Sequence[str] = ()
    identity_path: Path | None = None
    swarm_key_path: Path | None = None
    dial_timeout: float = 5.0
    handshake_timeout: float = 5.0
    bootstrap_backoff_initial: float = 0.5
    bootstrap_backoff_max: float = 30.0
    bootstrap_check_interval: float = 1.0
    gossip_degree: int = 6
    gossip_heartbeat: int = 1
    # gossipsub's own limit (py-libp2p default 10): messages per second per forwarder per topic that
    # we relay further (delivery to our subscribers is not limited by it)
    gossip_max_msgs_per_second: float = 20.0
    # dropped before any signature check: a forwarder sending more new messages per second than this
    gossip_max_msgs_per_forwarder: float = 200.0
    # per signer (token bucket), before the topic validator: a daemon announces every 2 s, bursts
    # of announce_now are coalesced to one per 0.5 s
    gossip_source_rate: float = 5.0
    gossip_source_burst: float = 20.0
    # None: any peer; else only these peer ids may connect, open streams, publish
    allow_peers: frozenset[str] | None = None
    max_streams_per_peer: int = 256  # inbound streams open at once, all protocols
    max_streams_per_protocol: int = 64  # concurrent handler runs per peer per protocol
    max_buffered_bytes_per_peer: int = 128 << 20  # unread bytes buffered by the muxer per peer
    lock_identity: bool = True  # hold an flock on identity_path for the node's lifetime


# ----------------------------------------------------------------------------------- identity


def check_private_file(path: Path, what: str) -> None:
    """Refuse a secret file that group/other can read or write, or that another user owns."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise IdentityError(f"{what} {path} is a symlink; point the flag at the real file")
    if st.st_uid != os.getuid():
        raise IdentityError(f"{what} {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); "
                            f"use a file of your own (chown, or another --identity)")
    if st.st_mode & 0o066:
        raise IdentityError(f"{what} {path} can be read or written by other users (mode "
                            f"{stat.S_IMODE(st.st_mode):o}); fix it with: chmod 600 {path}")


def load_or_create_identity(path: Path | None) -> KeyPair:
    """Load the Ed25519 key at ``path``, or create it (parents made, mode 0600, atomic write).

    Raises IdentityError if the file exists but is not a valid key (it is never overwritten), is a
    symlink, or can be read by group/other (the message says ``chmod 600 FILE``).
    """
    if path is None:
        return _new_ed25519()
    path = Path(path)
    if path.exists() or path.is_symlink():
        check_private_file(path, "identity file")
        try:
            data = read_key_file(path, "identity file")
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror or e}") from None
        try:
            priv = deserialize_private_key(data)
        except Exception as e:
            raise IdentityError(f"identity file {path} is not a libp2p private key ({e}); move it away to make a new one") from None
        return KeyPair(priv, priv.get_public_key())
    kp = _new_ed25519()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, kp.private_key.serialize())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return kp


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def read_swarm_key(path: Path) -> str:
    """Return the 64-hex-char pre-shared key from an IPFS-style ``swarm.key`` or a bare hex file."""
    try:
        text = read_key_file(Path(path), "swarm key", max_bytes=4096).decode("utf-8", "replace").strip()
    except OSError as e:
        raise SwarmKeyError(f"cannot read the swarm key {path}: {e.strerror or e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("/key/swarm/psk/"):
        if len(lines) != 3 or lines[1] != "/base16/":
            raise SwarmKeyError(f"{path}: expected '/key/swarm/psk/1.0.0/', '/base16/', then 64 hex chars")
        key = lines[2]
    elif len(lines) == 1:
        key = lines[0]
    else:
        raise SwarmKeyError(f"{path}: not a swarm key file")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", key):
        raise SwarmKeyError(f"{path}: the key must be 64 hex characters (32 bytes)")
    return key.lower()


def write_swarm_key(path: Path) -> None:
    """Create a new random swarm key file (IPFS format, mode 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"/key/swarm/psk/1.0.0/\n/base16/\n{os.urandom(32).hex()}\n".encode())
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- addresses


def _local_ipv4s() -> list[str]:
    """Concrete IPv4 addresses of this machine (loopback last), best effort without netifaces."""
    ips: list[str] = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ip = str(info[4][0])
            if ip not in ips and not ip.startswith("127."):
                ips.append(ip)
    except OSError:
        pass
    try:  # the address of the default route (no packet is sent by a UDP connect)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
            if ip not in ips and not ip.startswith("127."):
                ips.append(ip)
    except OSError:
        pass
    return [*ips, "127.0.0.1"]


def expand_addrs(addrs: Sequence[str]) -> list[str]:
    """Replace ``/ip4/0.0.0.0`` with each concrete local IPv4 address; keep order, drop dups."""
    out: list[str] = []
    for a in addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            rest = a[len("/ip4/0.0.0.0") :]
            cands = [f"/ip4/{ip}{rest}" for ip in _local_ipv4s()]
        else:
            cands = [a]
        for c in cands:
            if c not in out:
                out.append(c)
    return out


def split_p2p_addr(addr: str) -> tuple[str, str]:
    """``/ip4/1.2.3.4/tcp/1/p2p/Qm..`` -> (``/ip4/1.2.3.4/tcp/1``, ``Qm..``). Raises ValueError."""
    try:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as e:
        raise ValueError(f"{addr!r} is not a multiaddr ending in /p2p/<peer id> ({e})") from None
    return str(info.addrs[0]) if info.addrs else "", info.peer_id.to_base58()


def _strip_p2p(addr: str) -> str:
    i = addr.find("/p2p/")
    return addr[:i] if i >= 0 else addr


# ----------------------------------------------------------------------------------- node


StreamHandler = Callable[[FramedStream, str], Awaitable[None]]
PubsubValidator = Callable[[bytes, str], bool]


@dataclasses.dataclass
class BootstrapState:
    addr: str
    peer_id: str
    connected: bool = False
    attempts: int = 0
    failures: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "peer_id": self.peer_id,
            "connected": self.connected,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


class Subscription:
    """Messages of one pubsub topic that passed validation: ``async for data, source in sub``.

    ``source`` is the base58 id of the peer that signed the message (strict signing is on, so
    it cannot be forged by a forwarder).
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[bytes, str]:
        try:
            msg = await self._raw.get()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        return bytes(msg.data), ID(msg.from_id).to_base58()

    async def get(self) -> tuple[bytes, str]:
        return await self.__anext__()


def pubsub_fault(*, has_stream: bool, stream_on_live_conn: bool, queue_open: bool) -> str | None:
    """What is wrong with a connected peer's pubsub registration, or None (pure: see
    :meth:`Node._pubsub_repair_loop`)."""
    if not has_stream:
        return "connected without a pubsub stream"
    if not stream_on_live_conn:
        return "its pubsub stream is on a connection that is gone"
    if not queue_open:
        return "nothing sends to it any more"
    return None


class Node:
    """A running libp2p host. Created by :func:`open_node`; do not construct directly."""

    def __init__(self, cfg: NodeConfig, host: Any, key_pair: KeyPair, pubsub: Pubsub, nursery: trio.Nursery) -> None:
        self.cfg = cfg
        self._host = host
        self._key_pair = key_pair
        self.pubsub = pubsub
        self._nursery = nursery
        self.peer_id: str = peer_id_of(key_pair)
        self._bootstrap: list[BootstrapState] = []
        self._ping = PingService(host)
        # Hooks set by p2p.nat.run_nat_services: addrs_hook(addrs) -> addrs to advertise
        # (adds /p2p-circuit addrs behind NAT); dial_hook(peer_id, addrs, timeout) dials
        # every address incl. circuits (host.connect drops circuits, dials one TCP addr).
        self.addrs_hook: Callable[[list[str]], list[str]] | None = None
        self.dial_hook: Callable[[str, Sequence[str], float], Awaitable[Any]] | None = None
        self.resources: PeerResources | None = None  # set by open_node
        self.refused_connections = 0
        self._handler_runs: collections.Counter[tuple[str, str]] = collections.Counter()  # (peer, protocol)
        self.refused_streams: collections.Counter[str] = collections.Counter()  # protocol -> count
        self._source_bucket = TokenBucket(cfg.gossip_source_rate, cfg.gossip_source_burst)
        self.dropped_source_rate = 0
        self.pubsub_repairs = 0  # peers reconnected for a broken pubsub registration (_pubsub_repair_loop)

    def peer_allowed(self, peer_id: str) -> bool:
        """Whether ``peer_id`` may connect, open streams and publish (``--allow-peers``; everyone
        when no list is set). One set lookup: cheap enough for every stream and message."""
        allow = self.cfg.allow_peers
        return allow is None or peer_id == self.peer_id or peer_id in allow

    def limits_status(self) -> dict[str, Any]:
        """Counters of what the perimeter refused (for /status)."""
        res = self.resources
        return {
            "allow_peers": len(self.cfg.allow_peers) if self.cfg.allow_peers is not None else None,
            "refused_connections": self.refused_connections,
            "refused_streams": dict(res.refused) if res else {},
            "refused_streams_by_protocol": dict(self.refused_streams),
            "dropped_pubsub_forwarder_rate": getattr(self.pubsub, "dropped_forwarder_rate", 0),
            "dropped_pubsub_source_rate": self.dropped_source_rate,
            "pubsub_repairs": self.pubsub_repairs,
        }

    @property
    def host(self) -> Any:
        """The py-libp2p host (for p2p.nat only)."""
        return self._host

    # -- addresses and peers

    def addrs(self) -> list[str]:
        """Full multiaddrs (with ``/p2p/<id>``): announce addresses first, then the listen
        addresses with 0.0.0.0 expanded to concrete interface addresses (loopback last)."""
        listen = [_strip_p2p(str(a)) for a in self._host.get_transport_addrs()]
        base = expand_addrs([*self.cfg.announce, *listen])
        out = [f"{_strip_p2p(a)}/p2p/{self.peer_id}" for a in base]
        return self.addrs_hook(out) if self.addrs_hook is not None else out

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._host.get_network().connections.keys() if self._has_conn(p)]

    def is_connected(self, peer_id: str) -> bool:
        try:
            return self._has_conn(ID.from_base58(peer_id))
        except Exception:
            return False

    def _has_conn(self, pid: ID) -> bool:
        return bool(self._live_muxed(self._host.get_network().connections.get(pid)))

    @staticmethod
    def _live_muxed(conns: Any) -> list[Any]:
        """The open muxed connections among a peer's entry in the network's connection table."""
        if not conns:
            return []
        conns = conns if isinstance(conns, list) else [conns]
        return [m for c in conns if not getattr(m := getattr(c, "muxed_conn", None), "is_closed", False)]

    def security_protocols(self) -> dict[str, Any]:
        """The connection security and muxer protocols this host negotiates (for /status and
        tests: Noise and yamux only)."""
        up = self._host.get_network().upgrader
        return {
            "security": [str(p) for p in up.security_multistream._selector.handlers],
            "muxer": [str(p) for p in up.muxer_multistream._selector.handlers],
            "swarm_key": self.cfg.swarm_key_path is not None,
        }

    def bootstrap_status(self) -> list[dict[str, Any]]:
        for b in self._bootstrap:
            b.connected = self.is_connected(b.peer_id)
        return [b.as_dict() for b in self._bootstrap]

    # -- dialing

    async def connect(self, peer_id: str, addrs: Sequence[str] | None = None, timeout: float | None = None) -> None:
        """Ensure a connection to ``peer_id`` (dialing ``addrs`` or known ones). Raises DialError."""
        if peer_id == self.peer_id:
            raise DialError("refusing to dial ourselves")
        try:
            pid = ID.from_base58(peer_id)
        except Exception:
            raise DialError(f"{peer_id!r} is not a peer id") from None
        if self._has_conn(pid):
            return
        maddrs = []
        for a in addrs or ():
            try:
                maddrs.append(multiaddr.Multiaddr(_strip_p2p(a)))
            except Exception:
                log.debug("ignoring bad address %r for %s", a, peer_id)
        network = self._host.get_network()
        with contextlib.suppress(Exception):
            network.unblock_peer(pid)  # the 60 s negative dial cache would refuse our retries
        timeout = self.cfg.dial_timeout if timeout is None else timeout
        try:
            with trio.fail_after(timeout):
                if self.dial_hook is not None and addrs:
                    await self.dial_hook(peer_id, list(addrs), timeout)
                else:
                    await self._host.connect(PeerInfo(pid, maddrs))
        except trio.TooSlowError:
            raise DialError(f"dial to {peer_id} timed out after {timeout:.1f}s (unreachable, or a different swarm key?)") from None
        except DialError:
            raise
        except Exception as e:
            raise DialError(f"cannot connect to {peer_id} at {[str(m) for m in maddrs] or 'known addrs'}: {_cause(e)}") from e

    async def open_stream(
        self, peer_id: str, protocol_id: str, addrs: Sequence[str] | None = None, timeout: float = 10.0,
        max_frame: int | None = None,
    ) -> FramedStream:
        """Open a stream for ``protocol_id`` to ``peer_id`` (connecting first if needed).

        Raises DialError if the peer cannot be reached or does not speak the protocol within
        ``timeout`` seconds. The caller owns the returned stream and must close it.
        """
        with trio.move_on_after(timeout) as scope:
            await self.connect(peer_id, addrs, timeout=timeout)
            try:
                raw = await self._host.new_stream(ID.from_base58(peer_id), [protocol_id])
            except Exception as e:
                raise DialError(f"cannot open {protocol_id} stream to {peer_id}: {_cause(e)}") from e
            return FramedStream(raw, peer=peer_id, **({} if max_frame is None else {"max_frame": max_frame}))
        assert scope.cancelled_caught
        raise DialError(f"opening {protocol_id} stream to {peer_id} timed out after {timeout:.1f}s")

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler, *, max_frame: int | None = None,
                           max_per_peer: int | None = None) -> None:
        """Serve ``protocol_id``: ``await handler(stream, remote_peer_id)`` per incoming stream.

        Each stream already runs in its own task (libp2p spawns one per stream). The stream is
        closed when the handler returns; exceptions are logged, never propagated to the host.
        A peer not allowed (``allow_peers``), or already running ``max_per_peer`` (default
        ``cfg.max_streams_per_protocol``) handlers of this protocol, has its stream reset at once.
        ``max_frame`` bounds the frames read from the stream (default: p2p.framing's).
        Per-stream cost: one set lookup and one counter update.
        """
        cap = self.cfg.max_streams_per_protocol if max_per_peer is None else max_per_peer
        frame_kw = {} if max_frame is None else {"max_frame": max_frame}

        async def _on_stream(raw: Any) -> None:
            try:
                remote = raw.muxed_conn.peer_id.to_base58()
            except Exception:
                remote = "?"
            key = (remote, protocol_id)
            if not self.peer_allowed(remote) or self._handler_runs[key] >= cap:
                self.refused_streams[protocol_id] += 1
                why = "not in --allow-peers" if not self.peer_allowed(remote) else f"{cap} streams already running"
                limit_log.warning(f"proto:{remote}:{protocol_id}", "reset a %s stream from %s: %s", protocol_id,
                                   remote, why)
                with contextlib.suppress(Exception):
                    await raw.reset()
                return
            self._handler_runs[key] += 1
            fs = FramedStream(raw, peer=remote, **frame_kw)
            try:
                await handler(fs, remote)
            except Exception as e:
                limit_log.warning(f"fail:{remote}:{protocol_id}", "handler for %s from %s failed: %s: %s",
                                   protocol_id, remote, type(e).__name__, e)
                with contextlib.suppress(Exception):
                    await raw.reset()
            finally:
                if self._handler_runs[key] <= 1:
                    del self._handler_runs[key]
                else:
                    self._handler_runs[key] -= 1
                await fs.close()

        self._host.set_stream_handler(protocol_id, _on_stream)

    async def ping(self, peer_id: str, timeout: float = 5.0) -> float:
        """Round-trip time in seconds to ``peer_id``: two libp2p pings on one stream, the second
        timed (the first also pays for opening the stream, two or three round trips more).
        Raises DialError on failure/timeout."""
        try:
            with trio.fail_after(timeout):
                await self.connect(peer_id, timeout=timeout)
                marks: list[float] = []
                async for _ in self._ping.ping_iter(ID.from_base58(peer_id), 2):
                    marks.append(trio.current_time())
                return marks[1] - marks[0]
        except trio.TooSlowError:
            raise DialError(f"ping to {peer_id} timed out after {timeout:.1f}s") from None
        except DialError:
            raise
        except Exception as e:
            raise DialError(f"ping to {peer_id} failed: {_cause(e)}") from e

    # -- pubsub

    async def subscribe(self, topic: str, validator: PubsubValidator | None = None) -> Subscription:
        """Subscribe to ``topic``. ``validator(data, source_peer_id) -> bool`` runs on every
        message (ours included) before delivery and forwarding: False drops it (not relayed).
        Drain the subscription promptly: libp2p's queue holds only 32 messages.

        Before ``validator``, every message from another signer is dropped if the signer is not
        allowed (``allow_peers``) or publishes faster than ``gossip_source_rate`` (token bucket)."""

        def _v(forwarder: Any, msg: Any) -> bool:
            try:
                source = ID(msg.from_id).to_base58()
                if source != self.peer_id:
                    if not self.peer_allowed(source):
                        return False
                    if not self._source_bucket.allow(source):
                        self.dropped_source_rate += 1
                        limit_log.warning(f"src:{source}", "peer %s publishes faster than %.0f/s on %s: dropping",
                                           source, self._source_bucket.rate, topic)
                        return False
                return validator is None or bool(validator(bytes(msg.data), source))
            except Exception as e:  # a validator bug must not break the pubsub loop
                log.warning("pubsub validator for %s raised %s: %s", topic, type(e).__name__, e)
                return False

        self.pubsub.set_topic_validator(topic, _v, False)
        return Subscription(await self.pubsub.subscribe(topic))

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and publish ``data`` (keep it well under 1 MiB: bigger messages vanish)."""
        if len(data) > 512 * 1024:
            raise ValueError(f"pubsub message of {len(data)} bytes is too big (limit 512 KiB)")
        await self.pubsub.publish(topic, data)

    def topic_peers(self, topic: str) -> list[str]:
        return [p.to_base58() for p in self.pubsub.peer_topics.get(topic, ())]

    # -- pubsub health

    def _pubsub_state(self) -> list[tuple[Any, str]]:
        """(peer, what is wrong) for every connected peer whose pubsub registration is broken."""
        net = self._host.get_network()
        out = []
        for pid, conns in list(net.connections.items()):
            live = {id(m) for m in self._live_muxed(conns)}
            if not live:
                continue
            stream = self.pubsub.peers.get(pid)
            queue = getattr(self.pubsub, "peer_queues", {}).get(pid)
            why = pubsub_fault(has_stream=stream is not None,
                               stream_on_live_conn=stream is not None and id(getattr(stream, "muxed_conn", None)) in live,
                               queue_open=queue is not None and not getattr(queue, "closed", False))
            if why:
                out.append((pid, why))
        return out

    async def _pubsub_repair_loop(self, period: float = 5.0) -> None:
        """py-libp2p keeps one pubsub stream per peer id. A peer that restarts with the same
        identity can reconnect before the old connection's death is processed: the old stream
        stays registered (so the new connection gets none), or its sending task ends without
        cleanup; either way nothing is sent to that peer again and a restarted daemon hears
        nobody (seen in a churn soak: a restarted head saw no peer for 10 minutes). Seen twice in
        a row, the peer is disconnected and dialed again: a fresh connection rebuilds pubsub state
        on both sides (re-registering only our side would not: we forgot its subscriptions)."""
        suspect: set[Any] = set()
        while True:
            await trio.sleep(period)
            try:
                broken = dict(self._pubsub_state())
            except Exception as e:  # library internals moved: say so once per period, keep going
                log.debug("pubsub health check failed: %s", e)
                continue
            for pid, why in broken.items():
                if pid not in suspect:
                    continue
                self.pubsub_repairs += 1
                log.warning("reconnecting %s: %s", pid.to_base58(), why)
                self._nursery.start_soon(self._reconnect, pid)
            suspect = set(broken)

    async def _reconnect(self, pid: Any) -> None:
        net = self._host.get_network()
        addrs = []
        with contextlib.suppress(Exception):
            addrs = [str(a) for a in self._host.get_peerstore().addrs(pid)]
        with contextlib.suppress(Exception), trio.move_on_after(10):
            await net.close_peer(pid)
        await trio.sleep(0.5)
        with contextlib.suppress(DialError):  # else the peer dials us (its bootstrap loop or discovery)
            await self.connect(pid.to_base58(), addrs)

    # -- bootstrap

    async def _bootstrap_loop(self, st: BootstrapState, addr_no_p2p: str) -> None:
        """Keep one bootstrap peer connected: retry forever with exponential backoff + jitter."""
        delay = self.cfg.bootstrap_backoff_initial
        while True:
            if self.is_connected(st.peer_id):
                st.connected = True
                delay = self.cfg.bootstrap_backoff_initial
                await trio.sleep(self.cfg.bootstrap_check_interval)
                continue
            st.connected = False
            st.attempts += 1
            try:
                await self.connect(st.peer_id, [addr_no_p2p], timeout=self.cfg.dial_timeout)
            except DialError as e:
                st.failures += 1
                st.last_error = str(e)
                log.info("bootstrap %s: attempt %d failed (%s); retrying in %.1fs", st.addr, st.attempts, e, delay)
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.cfg.bootstrap_backoff_max)
            else:
                st.connected = True
                st.last_error = None
                log.info("bootstrap %s: connected (attempt %d)", st.addr, st.attempts)
                # never spin: a connection that closes at once would otherwise be redialled in a loop
                await trio.sleep(self.cfg.bootstrap_check_interval)


def _cause(e: BaseException) -> str:
    """The innermost meaningful message of a libp2p exception chain."""
    parts = []
    seen = 0
    while e is not None and seen < 6:
        parts.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return " <- ".join(parts)


@contextlib.asynccontextmanager
async def open_node(cfg: NodeConfig) -> AsyncIterator[Node]:
    """Start a host listening on ``cfg.listen``, with gossipsub and the bootstrap reconnect loop.

    Everything runs in a nursery owned by this context manager; leaving it closes the host,
    its connections and all background tasks. Raises IdentityError / SwarmKeyError for bad
    key files, ValueError for a malformed address, OSError if a listen address cannot be bound.
    """
    lock = IdentityLock(cfg.identity_path).acquire() if cfg.identity_path and cfg.lock_identity else None
    try:
        async with _open_node(cfg) as node:
            yield node
    finally:
        if lock is not None:
            lock.release()


@contextlib.asynccontextmanager
async def _open_node(cfg: NodeConfig) -> AsyncIterator[Node]:
    key_pair = load_or_create_identity(cfg.identity_path)
    psk = read_swarm_key(cfg.swarm_key_path) if cfg.swarm_key_path else None
    listen = [multiaddr.Multiaddr(a) for a in cfg.listen]
    boots: list[tuple[BootstrapState, str]] = []
    for b in cfg.bootstrap:
        addr, pid = split_p2p_addr(b)
        boots.append((BootstrapState(addr=b, peer_id=pid), addr))

    conn_cfg = ConnectionConfig(
        max_connections_per_peer=1,
        dial_timeout=cfg.dial_timeout,
        inbound_upgrade_timeout=cfg.handshake_timeout,
        outbound_upgrade_timeout=cfg.handshake_timeout,
    )
    host = libp2p.new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=_new_x25519().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        listen_addrs=listen,
        connection_config=conn_cfg,
        psk=psk,
        negotiate_timeout=max(1, int(cfg.handshake_timeout)),
    )
    gossipsub = GossipSub(
        protocols=GOSSIPSUB_PROTOCOLS,
        degree=cfg.gossip_degree,
        degree_low=max(1, cfg.gossip_degree - 2),
        degree_high=cfg.gossip_degree * 2,
        heartbeat_interval=cfg.gossip_heartbeat,
        max_messages_per_topic_per_second=cfg.gossip_max_msgs_per_second,
    )
    use_bounded_yamux(host, cfg.max_buffered_bytes_per_peer)
    pubsub = GatedPubsub(host, gossipsub, strict_signing=True, forwarder_rate=cfg.gossip_max_msgs_per_forwarder)
    holder: list[Node] = []
    resources = PeerResources(cfg, lambda peer: holder[0].peer_allowed(peer) if holder else cfg.allow_peers is None)
    # no global stream semaphore: it queues everyone's streams behind one peer's flood
    host.get_network().set_resource_manager(resources, enable_stream_semaphore=False)

    async with host.run(listen_addrs=listen):
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            with trio.fail_after(10):
                await pubsub.wait_until_ready()
            async with trio.open_nursery() as nursery:
                node = Node(cfg, host, key_pair, pubsub, nursery)
                node.resources = resources
                holder.append(node)
                if cfg.allow_peers is not None:
                    host.get_network().register_notifee(AllowNotifee(node))
                nursery.start_soon(node._pubsub_repair_loop)
                for st, addr in boots:
                    if st.peer_id == node.peer_id:
                        continue  # a node listed as its own bootstrap
                    node._bootstrap.append(st)
                    nursery.start_soon(node._bootstrap_loop, st, addr)
                log.info("node %s listening on %s", node.peer_id, node.addrs())
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
            # Close connections and listeners while pubsub still runs: otherwise a pubsub
            # stream still reading from a peer schedules work on pubsub's closed nursery
            # ("Nursery is closed to new arrivals", seen ~1 in 15 shutdowns).
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                try:
                    await host.close()
                except Exception as e:
                    log.debug("error while closing the host: %s: %s", type(e).__name__, e)


__all__ = [
    "AllowListError",
    "DialError",
    "IdentityInUse",
    "IdentityLock",
    "IdentityError",
    "Node",
    "NodeConfig",
    "Subscription",
    "SwarmKeyError",
    "configure_libp2p_logging",
    "expand_addrs",
    "load_or_create_identity",
    "open_node",
    "read_allow_peers",
    "read_swarm_key",
    "split_p2p_addr",
    "write_swarm_key",
]
