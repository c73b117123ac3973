"""NAT traversal for the swarm: reachability check, circuit relay v2, DCUtR hole punching.

Entry point (run by the daemon in its nursery, next to the host)::

    nat_service = await nursery.start(run_nat_services, node, NatConfig(...))
    nat_service.advertised_addrs()        # what discovery should announce (str multiaddrs)
    await nat_service.connect(peer_id, addrs)   # direct, else relayed; DCUtR upgrades later
    nat_service.connection_kind(peer_id)  # "direct" | "relayed" | None
    nat_service.status()                  # dict for /status

``node`` is anything with a ``host`` attribute holding a py-libp2p 0.8.1 host (the
``p2p.host`` node); a bare host works too.

What runs:

* Reachability: py-libp2p's AutoNAT v1 reports every node public (its dial-back reuses
  the open connection). Instead we ask up to three directly connected peers, over
  ``/molink/dialback/1.0.0``, to open a *fresh* TCP connection to our candidate
  addresses and complete a Noise handshake that proves our peer id. A peer only
  dials addresses on the IP it sees us connect from (no scanning on anyone's behalf)
  and answers within :attr:`NatConfig.dialback_timeout`. One confirmed address
  makes us ``public``; failures from every asked peer make us ``private``.
* Relay service (HOP) with limits on ``public`` nodes (``relay_service=True``): a relay carries
  strangers' traffic, so every circuit ends after ``circuit_duration`` seconds or ``circuit_data``
  bytes (both directions together; the peers redial, DCUtR may go direct), at most
  ``max_circuits_per_peer`` circuits run to one reserved peer, ``max_reservations`` reservations in
  all (one per peer id), and one peer may run at most ``max_hop_streams_per_peer`` HOP streams
  (reservations and circuits it opens) at once: more are reset before the library reads them.
* Reservations on up to ``reservations`` relays while not ``public``; the circuit
  addresses ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>`` are advertised.
* DCUtR on every node: a relayed connection is upgraded to a direct one when both
  NATs allow TCP hole punching (port-preserving cone NATs); otherwise the relay
  keeps carrying the traffic. Failed attempts are retried with backoff for as long as
  the connection stays relayed (:class:`PersistentDCUtR`).

Traps found in py-libp2p 0.8.1 (see also design.md section 6):

* ``host.connect`` drops ``/p2p-circuit`` addresses and dials only one TCP address per
  peer; :meth:`NatService.connect` dials each address itself and circuits through
  :class:`CircuitV2Transport`.
* ``host.get_addrs()`` strips the *first* ``/p2p/`` component of each address, which
  mangles circuit addresses: circuit addresses must not go through the host's address
  factory, hence :meth:`NatService.advertised_addrs`.
* DCUtR binds its hole-punch dials to the first TCP address of ``host.get_addrs()``.
  With ``new_host(announce_addrs=...)`` that is an address we do not own (bind fails
  with EADDRNOTAVAIL). Use :func:`announce_addrs_factory` instead of ``announce_addrs``.
* ``RelayLimits(data=0)`` is not "unlimited": the per-reservation fallback resets the
  circuit on its first byte. :attr:`NatConfig.circuit_data` defaults to 1 TiB.
* TCP hole punching fails if the NAT router answers the first (unsolicited) SYN with a
  RST, as a Linux router without an INPUT DROP rule does; real home routers drop it.
* With ``max_connections_per_peer=1`` (p2p.host), the swarm trims a peer's older
  connection when the hole-punched one arrives, even if streams are open on it:
  streams opened over the relay just before the upgrade can end with StreamEOF.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address

from p2p.framing import FrameError
from p2p.streams import FramedStream, StreamClosed

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/molink/dialback/1.0.0"
MAX_DIALBACK_ADDRS = 8
DIALBACK_MIN_INTERVAL = 1.5  # seconds between two dial-back requests served per peer
_DIALBACK_FRAME = 8192


class Reachability(str, enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclasses.dataclass(frozen=True)
class NatConfig:
    """NAT traversal settings (all optional)."""

    reachability: str = "auto"  # "auto" (dial-back check) | "public" | "private"
    relay_service: bool = True  # serve circuit relay v2 (HOP) when public
    relays: tuple[str, ...] = ()  # preferred relays (full multiaddrs with /p2p/<id>)
    reservations: int = 2  # relays to hold a reservation on while not public
    announce: tuple[str, ...] = ()  # addresses advertised although not listened on
    dcutr: bool = True
    dcutr_dial_timeout: int = 2  # DCUtR waits this long on each candidate address
    # relay limits (per relay node). Relays carry our pipelines behind symmetric NATs, so the
    # limits are generous next to go-libp2p's hole-punch-only defaults (2 min, 128 KiB), yet bounded.
    max_reservations: int = 128
    max_circuits_per_peer: int = 16  # concurrent circuits to one reserved peer
    max_hop_streams_per_peer: int = 8  # concurrent HOP streams (reserve/connect) from one peer
    circuit_duration: int = 3600  # seconds per relayed connection (0 = unlimited)
    # bytes per relayed connection, both directions. NOT 0: py-libp2p 0.8.1 treats data=0 as "no
    # budget" in its per-reservation fallback and resets the circuit on the first byte.
    circuit_data: int = 1 << 30
    reservation_ttl: int = 3600
    # timing
    dialback_timeout: float = 3.0
    check_interval: float = 300.0  # re-check reachability this often once known
    unknown_retry: float = 2.0  # ... and this often while unknown
    reserve_interval: float = 1.0  # look for relays this often while short of reservations
    direct_dial_timeout: float = 5.0
    relay_dial_delay: float = 0.3  # head start given to direct dials before circuits
    relay_dial_timeout: float = 15.0


def announce_addrs_factory(announce: Sequence[str]) -> Callable[[list[Any]], list[Any]]:
    """An ``addrs_factory`` for ``new_host``: listen addresses first, then ``announce``.

    Keeps DCUtR's hole punching bound to a local address (see module docstring)
    while still advertising ``announce`` through identify.
    """
    extra = [multiaddr.Multiaddr(a) for a in announce]

    def factory(candidates: list[Any]) -> list[Any]:
        seen = {str(c) for c in candidates}
        return list(candidates) + [a for a in extra if str(a) not in seen]

    return factory


def _ip_of(ma: Any) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(ma.value_for_protocol(proto))
        except Exception:
            continue
    return None


def _tcp_port(ma: Any) -> int | None:
    try:
        return int(ma.value_for_protocol("tcp"))
    except Exception:
        return None


def _strip_p2p(ma: Any) -> multiaddr.Multiaddr:
    s = str(ma)
    i = s.find("/p2p/")
    return multiaddr.Multiaddr(s[:i] if i >= 0 else s)


def is_circuit(addr: Any) -> bool:
    return "/p2p-circuit" in str(addr)


def connection_kind(host: Any, peer_id: ID) -> str | None:
    """``"direct"`` if any of ``host``'s connections to the peer is direct, ``"relayed"``, or None."""
    conns = host.get_network().connections.get(peer_id) or []
    if not isinstance(conns, list):
        conns = [conns]
    # a closed connection lingers in the table for a while (e.g. a circuit the relay just cut at its
    # limit): it must not make connect() skip the redial
    conns = [c for c in conns if not getattr(c, "is_closed", False)
             and not getattr(getattr(c, "muxed_conn", None), "is_closed", False)]
    kinds = [all(is_circuit(a) for a in _conn_addrs(c)) and bool(_conn_addrs(c)) for c in conns]
    if not kinds:
        return None
    return "relayed" if all(kinds) else "direct"


def hole_punch_backoff(failures: int, lo: float = 5.0, hi: float = 300.0) -> float:
    """Seconds to wait before the next hole-punch attempt after ``failures`` failed ones
    (exponential, capped; the caller adds jitter)."""
    return min(hi, lo * 2.0 ** max(0, failures - 1))


class PersistentDCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR with our own schedule for *initiating* hole punches.

    The library's drive loop wakes every 2 s on both peers, initiates towards every
    relayed peer at once, and gives up on a peer after three failed attempts for as long
    as its relayed connection lives: a NAT mapping that was not ready yet, a lost SYN or
    two sessions started on the same tick leave the pair relayed forever. Here:

    * the peer with the smaller id initiates at once; the other waits ``yield_delay`` (plus
      jitter) so the two do not run crossing sessions, yet still initiates if the first
      never does (another implementation may only respond);
    * after a failed attempt the peer is retried after :func:`hole_punch_backoff`
      (5 s, 10 s, ... 5 min, with jitter) for as long as the connection stays relayed;
    * attempts to different peers run concurrently (one slow peer delays no other).

    The responder side, the SYNC timing and the dials are the library's.
    """

    tick = 1.0
    yield_delay = 3.0

    def __init__(self, host: Any, **kw: Any) -> None:
        super().__init__(host, **kw)
        self.schedule: dict[ID, tuple[float, int]] = {}  # relayed peer -> (next attempt at, failures)
        self.attempts_total = 0
        self.upgrades_total = 0

    def _relayed_peers(self) -> list[ID]:
        me = self.host.get_id()
        return [pid for pid in list(self.host.get_network().connections)
                if pid != me and connection_kind(self.host, pid) == "relayed"]

    async def _auto_drive_loop(self) -> None:  # replaces the library's loop (same name, same caller)
        me = str(self.host.get_id())
        running: set[ID] = set()

        async def attempt(pid: ID, failures: int) -> None:
            self._hole_punch_attempts.pop(pid, None)  # our schedule replaces the library's budget
            self.attempts_total += 1
            try:
                ok = await self.initiate_hole_punch(pid)
            except Exception as e:  # noqa: BLE001 - any failure is retried later
                log.debug("hole punch to %s failed: %s", pid, e)
                ok = False
            finally:
                running.discard(pid)
            if ok or connection_kind(self.host, pid) == "direct":
                self.upgrades_total += 1
                self.schedule.pop(pid, None)
                log.info("nat: hole punch to %s succeeded (attempt %d)", pid, failures + 1)
                return
            wait = hole_punch_backoff(failures + 1) * random.uniform(0.8, 1.2)
            self.schedule[pid] = (trio.current_time() + wait, failures + 1)
            log.info("nat: hole punch to %s failed (attempt %d); retrying in %.0fs", pid, failures + 1, wait)

        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                relayed = set(self._relayed_peers())
                for pid in [p for p in self.schedule if p not in relayed and p not in running]:
                    del self.schedule[pid]  # gone, or direct now (maybe the other side's punch)
                for pid in relayed:
                    if pid in running or pid in self._in_progress:
                        continue
                    if pid not in self.schedule:
                        first = 0.0 if me < str(pid) else self.yield_delay + random.uniform(0.0, 1.0)
                        self.schedule[pid] = (now + first, 0)
                    at, failures = self.schedule[pid]
                    if now >= at:
                        running.add(pid)
                        nursery.start_soon(attempt, pid, failures)
                await trio.sleep(self.tick)


def _conn_addrs(conn: Any) -> list[str]:
    try:
        return [str(a) for a in conn.get_transport_addresses()]
    except Exception:
        return []


def _is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class NatService:
    """State and actions of NAT traversal on one host; created by :func:`run_nat_services`."""

    def __init__(self, host: Any, config: NatConfig) -> None:
        self.host = host
        self.config = config
        forced = {"public": Reachability.PUBLIC, "private": Reachability.PRIVATE}
        self.reachability = forced.get(config.reachability, Reachability.UNKNOWN)
        self.verified_addrs: list[str] = []  # addresses a peer dialed back successfully
        self.limits = RelayLimits(
            duration=config.circuit_duration,
            data=config.circuit_data,
            max_circuit_conns=config.max_circuits_per_peer,
            max_reservations=config.max_reservations,
            reservation_ttl=config.reservation_ttl,
        )
        self.protocol = CircuitV2Protocol(host, limits=self.limits, allow_hop=False)
        # STOP only: no CLIENT role, else every relayed dial also takes a reservation.
        self.transport = CircuitV2Transport(
            host, self.protocol, RelayConfig(roles=RelayRole.STOP, limits=self.limits)
        )
        self.dcutr: PersistentDCUtR | None = (
            PersistentDCUtR(host, dial_timeout=config.dcutr_dial_timeout) if config.dcutr else None
        )
        self.serving_relay = False
        self._reservations: dict[ID, tuple[float, list[str]]] = {}  # relay -> (expiry, circuit addrs)
        self._relay_backoff: dict[ID, float] = {}
        self._relay_failures: dict[ID, int] = {}
        self._dialback_served: dict[ID, float] = {}  # requester -> last time (rate limit)
        self._hop_streams: dict[ID, int] = {}  # peer -> HOP streams running (relay service)
        self.hop_refused = 0
        self._changed = trio.Event()
        self.events: list[tuple[float, str, str]] = []  # (time, event, detail), bounded

    # --- public API ---------------------------------------------------------------

    def advertised_addrs(self) -> list[str]:
        """Addresses to announce, best first (full multiaddrs ending in ``/p2p/<us>``).

        ``announce`` addresses, then addresses a peer verified by dialing back, then
        circuit addresses (while not public), then our interface addresses.
        """
        me = f"/p2p/{self.host.get_id()}"
        out: list[str] = []

        def add(a: str) -> None:
            a = str(_strip_p2p(a)) + me if not is_circuit(a) else a
            if a not in out:
                out.append(a)

        for a in self.config.announce:
            add(a)
        for a in self.verified_addrs:
            add(a)
        if self.reachability is not Reachability.PUBLIC:
            for _, circuits in self._reservations.values():
                for a in circuits:
                    add(a)
        for a in self.listen_addrs():
            add(str(a))
        return out

    def merge_addrs(self, base: list[str]) -> list[str]:
        """``base`` (a node's own address list) merged with :meth:`advertised_addrs`."""
        return list(dict.fromkeys([*self.advertised_addrs(), *base]))

    def listen_addrs(self) -> list[multiaddr.Multiaddr]:
        """Our TCP listen addresses with wildcards expanded, loopback last."""
        out: list[multiaddr.Multiaddr] = []
        for a in self.host.get_transport_addrs():
            if is_circuit(a):
                continue
            try:
                expanded = expand_wildcard_address(a)
            except Exception:
                expanded = [a]
            out.extend(expanded)
        return sorted(out, key=lambda m: _is_loopback(_ip_of(m)))

    def connection_kind(self, peer_id: ID) -> str | None:
        """``"direct"`` if any connection to the peer is direct, ``"relayed"``, or None."""
        return connection_kind(self.host, peer_id)

    async def connect(self, peer_id: ID | str, addrs: Iterable[str | multiaddr.Multiaddr]) -> str:
        """Make sure we have a connection to ``peer_id``; return its kind.

        Direct addresses are dialed concurrently; circuit addresses join after
        ``relay_dial_delay`` if no direct dial has succeeded. The first success wins.
        DCUtR later upgrades a relayed connection where the NATs allow it.

        Raises:
            ConnectionError: every address failed (message lists each failure).
        """
        pid = peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)
        kind = self.connection_kind(pid)
        if kind is not None:
            return kind
        mas = [a if isinstance(a, multiaddr.Multiaddr) else multiaddr.Multiaddr(a) for a in addrs]
        direct = [a for a in mas if not is_circuit(a)]
        circuits = [a for a in mas if is_circuit(a)]
        errors: list[str] = []
        cfg = self.config

        async def dial(a: multiaddr.Multiaddr, cancel: trio.CancelScope) -> None:
            try:
                if is_circuit(a):
                    await trio.sleep(cfg.relay_dial_delay if direct else 0)
                    if not str(a).endswith(f"/p2p/{pid}"):
                        a = multiaddr.Multiaddr(f"{a}/p2p/{pid}")
                    with trio.fail_after(cfg.relay_dial_timeout):
                        await self.transport.dial(a)
                else:
                    with trio.fail_after(cfg.direct_dial_timeout):
                        await self.host.get_network().dial_addr(_strip_p2p(a), pid)
                cancel.cancel()  # first success wins
            except Exception as e:  # collect and report every failure
                errors.append(f"{a}: {e!r}")

        async with trio.open_nursery() as nursery:
            for a in direct + circuits:
                nursery.start_soon(dial, a, nursery.cancel_scope)
        kind = self.connection_kind(pid)
        if kind is None:
            raise ConnectionError(
                f"cannot reach peer {pid} at any of {len(mas)} addresses: " + "; ".join(errors)
                if errors else f"no usable address for peer {pid}"
            )
        self._event("connected", f"{pid} {kind}")
        return kind

    def status(self) -> dict[str, Any]:
        return {
            "reachability": self.reachability.value,
            "verified_addrs": list(self.verified_addrs),
            "serving_relay": self.serving_relay,
            "relay_limits": self.relay_limits() if self.serving_relay else None,
            "hop_refused": self.hop_refused,
            "reservations": {str(k): v[1] for k, v in self._reservations.items()},
            "advertised_addrs": self.advertised_addrs(),
            "hole_punch": None if self.dcutr is None else {
                "attempts": self.dcutr.attempts_total,
                "upgrades": self.dcutr.upgrades_total,
                "retrying": {str(k): v[1] for k, v in self.dcutr.schedule.items() if v[1]},
            },
        }

    async def wait_changed(self) -> None:
        """Block until reachability, verified addresses or reservations change."""
        await self._changed.wait()

    # --- internals ----------------------------------------------------------------

    def _event(self, ev: str, detail: str = "") -> None:
        self.events.append((time.time(), ev, detail))
        del self.events[:-200]
        log.info("nat: %s %s", ev, detail)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _direct_peers(self) -> list[ID]:
        out = []
        for pid, conns in list(self.host.get_network().connections.items()):
            conns = conns if isinstance(conns, list) else [conns]
            if any(_conn_addrs(c) and not all(is_circuit(a) for a in _conn_addrs(c)) for c in conns):
                out.append(pid)
        return out

    def _set_reachability(self, r: Reachability) -> None:
        if r is not self.reachability:
            self._event("reachability", r.value)
            self.reachability = r
            self._update_relay_service()
            self._notify()

    def _update_relay_service(self) -> None:
        want = self.config.relay_service and self.reachability is Reachability.PUBLIC
        if want and not self.serving_relay:
            self.protocol.allow_hop = True
            self.host.set_stream_handler(HOP_PROTOCOL_ID, self._handle_hop)
            self.serving_relay = True
            self._event("relay-service", "on")
        elif not want and self.serving_relay:
            self.host.remove_stream_handler(HOP_PROTOCOL_ID)
            self.protocol.allow_hop = False
            self.serving_relay = False
            self._event("relay-service", "off")

    async def _handle_hop(self, stream: Any) -> None:
        """The library's HOP handler behind a per-peer cap on concurrent HOP streams."""
        try:
            peer = stream.muxed_conn.peer_id
        except Exception:
            peer = None
        running = self._hop_streams.get(peer, 0)
        if peer is None or running >= self.config.max_hop_streams_per_peer:
            self.hop_refused += 1
            log.debug("relay: resetting a HOP stream from %s (%d running)", peer, running)
            try:
                await stream.reset()
            except Exception:
                pass
            return
        self._hop_streams[peer] = running + 1
        try:
            await self.protocol._handle_hop_stream(stream)
        finally:
            left = self._hop_streams.get(peer, 1) - 1
            if left <= 0:
                self._hop_streams.pop(peer, None)
            else:
                self._hop_streams[peer] = left

    def relay_limits(self) -> dict[str, int]:
        """The limits the relay service enforces (read back from the library's objects)."""
        lim = self.protocol.limits
        return {"circuit_duration": lim.duration, "circuit_data": lim.data,
                "max_circuits_per_peer": lim.max_circuit_conns, "max_reservations": lim.max_reservations,
                "reservation_ttl": lim.reservation_ttl,
                "max_hop_streams_per_peer": self.config.max_hop_streams_per_peer}

    # dial-back: server side
    async def _handle_dialback(self, stream: Any) -> None:
        fs = FramedStream(stream, max_frame=_DIALBACK_FRAME, peer="dialback")
        try:
            requester = stream.muxed_conn.peer_id
            now = time.monotonic()
            if now - self._dialback_served.get(requester, -1e9) < DIALBACK_MIN_INTERVAL:
                await fs.send("dialback-result", {"ok": [], "error": "rate limited"})
                return
            if len(self._dialback_served) > 4096:
                self._dialback_served.clear()
            self._dialback_served[requester] = now
            req = await fs.recv(timeout=5)
            conn_addrs = _conn_addrs(stream.muxed_conn)
            observed_ip = _ip_of(multiaddr.Multiaddr(conn_addrs[0])) if conn_addrs else None
            if not conn_addrs or any(is_circuit(a) for a in conn_addrs) or observed_ip is None:
                await fs.send("dialback-result", {"ok": [], "error": "relayed or unknown source"})
                return
            cands: list[multiaddr.Multiaddr] = []
            for a in (req.get("addrs") or [])[:MAX_DIALBACK_ADDRS]:
                try:
                    ma = _strip_p2p(str(a))
                except Exception:
                    continue
                if _ip_of(ma) == observed_ip and _tcp_port(ma) and not is_circuit(ma):
                    cands.append(ma)
            ok: list[str] = []

            async def probe(ma: multiaddr.Multiaddr) -> None:
                if await _dial_fresh(self.host, ma, requester, self.config.dialback_timeout):
                    ok.append(str(ma))

            async with trio.open_nursery() as n:
                for ma in cands:
                    n.start_soon(probe, ma)
            await fs.send("dialback-result", {"ok": ok, "observed_ip": observed_ip})
        except (StreamClosed, FrameError, trio.TooSlowError) as e:
            log.debug("dialback request failed: %r", e)
        except Exception as e:  # a misbehaving peer must not kill the handler
            log.debug("dialback handler error: %r", e)
        finally:
            await fs.close()

    # dial-back: client side
    def _dialback_candidates(self) -> list[str]:
        cands = [str(_strip_p2p(a)) for a in self.config.announce]
        listen = self.listen_addrs()
        ports = {p for p in (_tcp_port(a) for a in listen) if p}
        observed = getattr(self.host, "_observed_addr_manager", None)
        obs_ips: list[str] = []
        if observed is not None:
            try:
                for a in observed.addrs(min_observers=1):
                    ip = _ip_of(a)
                    if ip and ip not in obs_ips and not is_circuit(a):
                        obs_ips.append(ip)
            except Exception:
                pass
        for ip in obs_ips:  # NAT port prediction: WAN IP + our listen port
            for p in sorted(ports):
                proto = "ip6" if ":" in ip else "ip4"
                cands.append(f"/{proto}/{ip}/tcp/{p}")
        cands += [str(a) for a in listen if not _is_loopback(_ip_of(a))]
        return list(dict.fromkeys(cands))[:MAX_DIALBACK_ADDRS]

    async def _ask_dialback(self, pid: ID, addrs: list[str]) -> list[str] | None:
        """Ask ``pid`` to dial ``addrs`` back; None when it could not answer."""
        try:
            with trio.fail_after(self.config.dialback_timeout + 5):
                stream = await self.host.new_stream(pid, [DIALBACK_PROTOCOL])
                fs = FramedStream(stream, max_frame=_DIALBACK_FRAME, peer=str(pid))
                try:
                    await fs.send("dialback", {"addrs": addrs})
                    resp = await fs.recv()
                finally:
                    await fs.close()
            ok = resp.get("ok")
            if resp.get("error") or not isinstance(ok, list):
                return None
            return [str(a) for a in ok]
        except Exception as e:
            log.debug("dialback via %s failed: %r", pid, e)
            return None

    async def check_reachability(self) -> Reachability:
        """Run one dial-back round now and return the (possibly updated) reachability."""
        if self.config.reachability != "auto":
            return self.reachability
        peers = self._direct_peers()[:3]
        addrs = self._dialback_candidates()
        if not peers or not addrs:
            return self.reachability
        results: list[list[str] | None] = []

        async def ask(pid: ID) -> None:
            results.append(await self._ask_dialback(pid, addrs))

        async with trio.open_nursery() as n:
            for pid in peers:
                n.start_soon(ask, pid)
        verified = sorted({a for r in results if r for a in r})
        answered = [r for r in results if r is not None]
        if verified:
            if verified != self.verified_addrs:
                self.verified_addrs = verified
                self._notify()
            self._set_reachability(Reachability.PUBLIC)
        elif answered:
            self.verified_addrs = []
            self._set_reachability(Reachability.PRIVATE)
        return self.reachability

    async def _reachability_loop(self) -> None:
        while True:
            r = await self.check_reachability()
            if r is not Reachability.UNKNOWN:
                await trio.sleep(self.config.check_interval)
            elif not self._direct_peers():
                await trio.sleep(0.5)  # nobody to ask yet: look again soon
            else:
                await trio.sleep(self.config.unknown_retry)

    # reservations
    def _relay_candidates(self) -> list[tuple[ID, list[multiaddr.Multiaddr]]]:
        out: list[tuple[ID, list[multiaddr.Multiaddr]]] = []
        for a in self.config.relays:
            ma = multiaddr.Multiaddr(a)
            pid = ID.from_base58(ma.value_for_protocol("p2p"))
            out.append((pid, [_strip_p2p(ma)]))
        known = {p for p, _ in out}
        for pid in self._direct_peers():
            if pid in known:
                continue
            try:
                addrs = [c for c in self.host.get_peerstore().addrs(pid) if not is_circuit(c)]
            except Exception:  # PeerStoreError: the peer left between the two calls
                continue
            out.append((pid, addrs))
        return out

    async def _reserve(self, rid: ID, addrs: list[multiaddr.Multiaddr]) -> bool:
        try:
            with trio.fail_after(10):
                if self.connection_kind(rid) is None:
                    await self.connect(rid, [f"{a}/p2p/{rid}" for a in addrs])
                stream = await self.host.new_stream(rid, [HOP_PROTOCOL_ID])
                try:
                    ok = await self.transport._make_reservation(stream, rid)
                finally:
                    await stream.close()
        except Exception as e:
            log.debug("reservation on %s failed: %r", rid, e)
            return False
        if not ok:
            return False
        # circuit addresses through this relay's public (non-loopback, direct) addresses
        me = self.host.get_id()
        relay_addrs = [a for a in addrs if not is_circuit(a) and not _is_loopback(_ip_of(a))]
        conns = self.host.get_network().connections.get(rid) or []
        for c in conns if isinstance(conns, list) else [conns]:
            for a in _conn_addrs(c):
                if not is_circuit(a) and multiaddr.Multiaddr(a) not in relay_addrs:
                    relay_addrs.insert(0, multiaddr.Multiaddr(a))
        circuits = list(dict.fromkeys(f"{_strip_p2p(a)}/p2p/{rid}/p2p-circuit/p2p/{me}"
                                      for a in relay_addrs))
        expiry = float(self.transport._reservations.get(rid, time.time() + 3600))
        fresh = rid not in self._reservations or self._reservations[rid][1] != circuits
        self._reservations[rid] = (expiry, circuits)
        if fresh:
            self._event("reserved", f"{rid} {circuits}")
            self._notify()
        return True

    async def _reservation_loop(self) -> None:
        while True:
            now = time.time()
            # forget reservations whose relay went away or that expire soon
            for rid, (expiry, _) in list(self._reservations.items()):
                if self.connection_kind(rid) != "direct" or expiry - now < 60:
                    del self._reservations[rid]
                    self._event("reservation-lost", str(rid))
                    self._notify()
            want = self.reachability is not Reachability.PUBLIC
            if want and len(self._reservations) < self.config.reservations:
                for rid, addrs in self._relay_candidates():
                    if len(self._reservations) >= self.config.reservations:
                        break
                    if rid in self._reservations or self._relay_backoff.get(rid, 0) > now:
                        continue
                    if not await self._reserve(rid, addrs):
                        # a peer may start serving HOP seconds later (once it knows it is
                        # public): retry soon, then back off
                        n = self._relay_failures[rid] = self._relay_failures.get(rid, 0) + 1
                        self._relay_backoff[rid] = now + min(60.0, 0.5 * 2 ** min(n, 7))
                    else:
                        self._relay_failures.pop(rid, None)
            elif not want and self._reservations:
                self._reservations.clear()
                self._notify()
            with trio.move_on_after(self.config.reserve_interval):
                await self._changed.wait()


async def _dial_fresh(host: Any, ma: multiaddr.Multiaddr, peer_id: ID, timeout: float) -> bool:
    """Open a new TCP connection to ``ma`` and run the security handshake expecting ``peer_id``.

    The connection never joins the swarm (it is closed right after), so it cannot
    be confused with, or replace, the connection the request came on.
    """
    network = host.get_network()
    transport = network.transport_manager.transport_for_dialing(ma)
    if transport is None:
        return False
    raw = None
    try:
        with trio.fail_after(timeout):
            raw = await transport.dial(ma)
            secured = await network.upgrader.upgrade_security(raw, True, peer_id)
            await secured.close()
        return True
    except Exception as e:
        log.debug("dial-back to %s failed: %r", ma, e)
        if raw is not None:
            with trio.move_on_after(1):
                try:
                    await raw.close()
                except Exception:
                    pass
        return False


async def run_nat_services(
    node: Any,
    config: NatConfig | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run NAT traversal for ``node`` (or a bare host) until cancelled.

    Call with ``await nursery.start(run_nat_services, node, config)``; it returns the
    :class:`NatService` once the relay STOP handler, DCUtR and dial-back handler are
    registered (before reachability is known). On cancellation every handler is removed.
    """
    host = getattr(node, "host", node)
    config = config or NatConfig()
    node_cfg = getattr(node, "cfg", None)
    if not config.announce and getattr(node_cfg, "announce", None):
        config = dataclasses.replace(config, announce=tuple(node_cfg.announce))
    svc = NatService(host, config)
    host.set_stream_handler(DIALBACK_PROTOCOL, svc._handle_dialback)
    if hasattr(node, "addrs_hook"):  # p2p.host.Node: advertise circuits, dial through relays
        node.addrs_hook = svc.merge_addrs

        async def dial_hook(peer_id: str, addrs: Sequence[str], timeout: float) -> None:
            await svc.connect(peer_id, addrs)

        node.dial_hook = dial_hook
    try:
        async with background_trio_service(svc.protocol):  # STOP handler (incoming circuits)
            # the library registers its own HOP handler in run(), which may start after the
            # manager says "started": only then put ours (the per-peer cap) in its place
            with trio.move_on_after(10):
                await svc.protocol.event_started.wait()
            svc._update_relay_service()
            async with trio.open_nursery() as nursery:
                if svc.dcutr is not None:
                    await nursery.start(_run_service, svc.dcutr)
                nursery.start_soon(_resilient, "reachability", svc._reachability_loop)
                nursery.start_soon(_resilient, "reservations", svc._reservation_loop)
                task_status.started(svc)
                await trio.sleep_forever()
    finally:
        if hasattr(node, "addrs_hook"):
            node.addrs_hook = None
            node.dial_hook = None
        try:
            host.remove_stream_handler(DIALBACK_PROTOCOL)
            if svc.serving_relay:
                host.remove_stream_handler(HOP_PROTOCOL_ID)
        except Exception:
            pass


async def _resilient(name: str, loop: Callable[[], Any]) -> None:
    """Run a NAT maintenance loop forever: a bug or a library surprise in one iteration is logged
    and the loop restarts after a pause; it never takes the daemon down."""
    delay = 1.0
    while True:
        try:
            await loop()
        except Exception as e:  # noqa: BLE001
            log.warning("NAT %s loop failed (%s: %s); restarting in %.0fs", name, type(e).__name__, e, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)


async def _run_service(service: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with background_trio_service(service):
        task_status.started()
        await trio.sleep_forever()
