"""Peer discovery: signed gossipsub announcements feeding the pure :class:`p2p.records.PeerTable`.

Every ``period`` seconds (and on :meth:`Discovery.announce_now`) this peer publishes its
:class:`PeerRecord` on ``molink/<model_hash[:16]>/peers/v1``. Incoming messages are checked in
the pubsub validator, so a bad message is neither delivered nor relayed:

- undecodable / invalid / oversized  -> ``dropped_bad`` (logged, rate-limited)
- another model hash                  -> ``dropped_foreign_model``
- record ``peer_id`` != message signer -> ``dropped_forged`` (gossipsub strict signing proves
  the signer, so a peer can only announce itself)
- signed ``time`` older than ``max_record_age`` (default 2 ttl) by our wall clock -> ``dropped_old``
  (a replayed record; or a sender whose clock is that far behind), or more than
  ``RECORD_MAX_FUTURE_SKEW`` (60 s) ahead -> ``dropped_future``
- a new peer on an IP address that already has ``max_per_ip`` peers -> ``dropped_ip_full``

Accepted records update the table (renewal, offline removal); silent peers expire after ``ttl``
(default 3 periods). Peers we learn about and are not connected to are dialled (bounded
concurrency, per-peer backoff, at most ``max_connections`` connections) so the mesh does not
hang on the bootstrap peer alone and streams to them open fast.

The node only needs: ``peer_id``, ``addrs()``, ``subscribe(topic, validator)``,
``publish(topic, data)``, ``is_connected(peer)``, ``connected_peers()``,
``connect(peer, addrs, timeout)`` — see :class:`p2p.host.Node`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from molinkd.limits import RECORD_MAX_AGE_TTLS, RECORD_MAX_FUTURE_SKEW, RECORD_MAX_PEERS_PER_IP
from p2p.ratelog import RateLimitedLog
from p2p.records import PeerRecord, PeerTable, RecordError, check_fresh, decode_record, encode_record

log = logging.getLogger(__name__)

_RECORD_FIELDS = {f for f in PeerRecord.__dataclass_fields__}  # noqa: C416


def topic_for(model_hash: str) -> str:
    return f"molink/{model_hash[:16]}/peers/v1"


class Discovery:
    """Announce this peer and maintain the table of live peers serving the same model.

    ``record_fn()`` returns this peer's current fields as a dict (span_start, span_end,
    total_layers, model_name, free_kv_blocks, throughput, active_requests, version, extras...);
    ``peer_id``, ``model_hash``, ``time`` and ``state`` are always filled in here and ``addrs``
    defaults to ``node.addrs()``. Unknown keys go into ``extras``.

    Run with ``await nursery.start(disc.run)``; it returns once subscribed. Cancelling the
    scope stops announcing without a goodbye (peers expire us after ``ttl``); call
    :meth:`leave` first for an immediate removal.
    """

    def __init__(
        self,
        node: Any,
        model_hash: str,
        record_fn: Callable[[], Mapping[str, Any]],
        period: float = 2.0,
        ttl: float | None = None,
        *,
        max_connections: int = 32,
        max_parallel_dials: int = 4,
        dial_timeout: float = 3.0,
        redial_after: float = 10.0,
        max_per_ip: int = RECORD_MAX_PEERS_PER_IP,
        max_record_age: float | None = None,
        max_future: float = RECORD_MAX_FUTURE_SKEW,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not model_hash:
            raise ValueError("model_hash is required")
        if period <= 0:
            raise ValueError("period must be positive")
        self.node = node
        self.model_hash = model_hash
        self.record_fn = record_fn
        self.period = period
        self.ttl = ttl if ttl is not None else 3 * period
        self.topic = topic_for(model_hash)
        self.max_record_age = max_record_age if max_record_age is not None else RECORD_MAX_AGE_TTLS * self.ttl
        self.max_future = max_future
        self.wall_clock = wall_clock
        self.table = PeerTable(self.ttl, clock=clock, max_per_ip=max_per_ip,
                               tombstone_ttl=max(self.ttl, self.max_record_age))
        self.max_connections = max_connections
        self.max_parallel_dials = max_parallel_dials
        self.dial_timeout = dial_timeout
        self.redial_after = redial_after
        self._stats = {
            "received": 0,
            "accepted": 0,
            "stale": 0,
            "dropped_bad": 0,
            "dropped_foreign_model": 0,
            "dropped_forged": 0,
            "dropped_old": 0,
            "dropped_future": 0,
            "dropped_ip_full": 0,
            "expired": 0,
            "removed_offline": 0,
            "published": 0,
            "publish_errors": 0,
            "dials": 0,
            "dial_failures": 0,
        }
        self._wake = trio.Event()
        self._last_publish = -1e9
        self._left = False
        self._last_dial: dict[str, float] = {}
        # peers whose goodbye (offline record) we took, and when (monotonic); forgotten when they
        # announce themselves again. Bounded: the oldest go first.
        self.departed: dict[str, float] = {}
        self._dial_send, self._dial_recv = trio.open_memory_channel[PeerRecord](64)
        self._warn = RateLimitedLog(log, interval=5.0)
        self._running = False

    # -- public

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def snapshot(self, now: float | None = None) -> list[PeerRecord]:
        return self.table.snapshot(now)

    def announce_now(self) -> None:
        """Publish our record as soon as possible (e.g. after a span or load change)."""
        self._wake.set()

    def my_record(self) -> PeerRecord:
        """Build this peer's current record from ``record_fn``. Raises RecordError if invalid."""
        fields = dict(self.record_fn())
        extras = dict(fields.pop("extras", None) or {})
        kw: dict[str, Any] = {}
        for k, v in fields.items():
            if k in _RECORD_FIELDS:
                kw[k] = v
            else:
                extras[k] = v
        kw.setdefault("addrs", self.node.addrs())
        kw.update(peer_id=self.node.peer_id, model_hash=self.model_hash, time=self.wall_clock(), extras=extras)
        kw.setdefault("state", "online")
        try:
            return PeerRecord(**kw)
        except TypeError as e:
            raise RecordError(f"record_fn returned unusable fields: {e}") from None

    async def leave(self, timeout: float = 2.0) -> None:
        """Publish an offline record (peers drop us at once) and stop announcing."""
        self._left = True
        self._wake.set()
        try:
            rec = self.my_record().replace(state="offline", time=self.wall_clock())
            with trio.move_on_after(timeout):
                await self.node.publish(self.topic, encode_record(rec))
                self._stats["published"] += 1
        except Exception as e:
            self._stats["publish_errors"] += 1
            log.warning("could not publish the offline record: %s: %s", type(e).__name__, e)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, then announce / receive / expire / dial until cancelled."""
        sub = await self.node.subscribe(self.topic, validator=self._validate)
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, sub)
                nursery.start_soon(self._publish_loop)
                nursery.start_soon(self._expire_loop)
                nursery.start_soon(self._dial_loop)
                task_status.started(self)
        finally:
            self._running = False

    # -- validation (runs inside pubsub, before delivery and relaying; must not block)

    def _validate(self, data: bytes, source: str) -> bool:
        if source == self.node.peer_id:
            return True  # our own publish
        self._stats["received"] += 1
        try:
            rec = decode_record(data)
        except RecordError as e:
            self._stats["dropped_bad"] += 1
            self._warn.warning(f"bad:{source}", "dropped a bad peer record from %s (%d bytes): %s", source, len(data), e)
            return False
        if rec.model_hash != self.model_hash:
            self._stats["dropped_foreign_model"] += 1
            self._warn.warning(
                f"foreign:{source}",
                "ignored a record from %s for another model (hash %s..., ours %s...)",
                source,
                rec.model_hash[:16],
                self.model_hash[:16],
            )
            return False
        if rec.peer_id != source:
            self._stats["dropped_forged"] += 1
            self._warn.warning(
                f"forged:{source}", "dropped a forged record: signed by %s but claims peer %s", source, rec.peer_id[:64]
            )
            return False
        wall = self.wall_clock()
        why = check_fresh(rec, wall, self.max_record_age, self.max_future)
        if why is not None:
            self._stats["dropped_old" if why == "old" else "dropped_future"] += 1
            self._warn.warning(
                f"{why}:{source}",
                "dropped a record from %s with a signed time %.1fs %s our clock (replayed, or its clock is off: "
                "keep clocks within %.0fs)",
                source,
                abs(wall - rec.time),
                "behind" if why == "old" else "ahead of",
                min(self.max_record_age, self.max_future),
            )
            return False
        return True

    # -- loops

    async def _receive_loop(self, sub: Any) -> None:
        async for data, source in sub:  # drained promptly: libp2p's queue holds 32 messages
            try:
                rec = decode_record(data)
            except RecordError:
                continue  # the validator already counted and logged it
            if rec.peer_id != source or rec.model_hash != self.model_hash:
                continue
            if source != self.node.peer_id and check_fresh(rec, self.wall_clock(), self.max_record_age, self.max_future):
                continue  # went stale in the queue (the validator counted fresh ones only)
            result = self.table.update(rec)
            if source == self.node.peer_id:
                continue
            if result == "stale":
                self._stats["stale"] += 1
                continue
            if result == "ip_full":
                self._stats["dropped_ip_full"] += 1
                self._warn.warning(f"ipfull:{source}", "ignored peer %s: its addresses %s already have %d peers",
                                   source, sorted(rec.ips())[:4], self.table.max_per_ip)
                continue
            if result == "full":
                continue
            self._stats["accepted"] += 1
            if result == "added":
                log.info("peer %s joined: span [%d, %d)", rec.peer_id, rec.span_start, rec.span_end)
                self.announce_now()  # let the newcomer learn about us without waiting a period
            elif result == "removed":
                self._stats["removed_offline"] += 1
                self.departed[rec.peer_id] = time.monotonic()
                while len(self.departed) > 1024:
                    self.departed.pop(next(iter(self.departed)))
                log.info("peer %s left", rec.peer_id)
            if rec.online:
                self.departed.pop(rec.peer_id, None)
                self._maybe_dial(rec)

    async def _publish_loop(self) -> None:
        min_gap = min(self.period / 4, 0.5)
        while not self._left:
            wait = max(self._last_publish + min_gap - trio.current_time(), 0)
            await trio.sleep(wait)  # announce_now bursts are coalesced
            if self._left:
                return
            self._wake = trio.Event()
            self._last_publish = trio.current_time()
            try:
                data = encode_record(self.my_record())
                with trio.move_on_after(max(self.period, 1.0)):
                    await self.node.publish(self.topic, data)
                    self._stats["published"] += 1
            except Exception as e:
                self._stats["publish_errors"] += 1
                self._warn.warning("publish", "announcement failed: %s: %s", type(e).__name__, e)
            with trio.move_on_after(self.period):
                await self._wake.wait()

    async def _expire_loop(self) -> None:
        interval = max(min(self.period, self.ttl / 4), 0.05)
        while True:
            await trio.sleep(interval)
            gone = self.table.expire()
            if gone:
                self._stats["expired"] += len(gone)
                log.info("peers expired (no announcement for %.1fs): %s", self.ttl, ", ".join(gone))

    def _maybe_dial(self, rec: PeerRecord) -> None:
        if not rec.addrs or self.node.is_connected(rec.peer_id):
            return
        now = trio.current_time()
        if now - self._last_dial.get(rec.peer_id, -1e9) < self.redial_after:
            return
        self._last_dial[rec.peer_id] = now
        if len(self._last_dial) > 4 * self.max_connections + 1000:
            cutoff = now - self.redial_after
            self._last_dial = {p: t for p, t in self._last_dial.items() if t >= cutoff}
        try:
            self._dial_send.send_nowait(rec)
        except trio.WouldBlock:
            pass  # plenty of dials queued already; the next announcement retries

    async def _dial_loop(self) -> None:
        limiter = trio.CapacityLimiter(self.max_parallel_dials)
        async with trio.open_nursery() as nursery:
            async for rec in self._dial_recv:
                if len(self.node.connected_peers()) >= self.max_connections:
                    continue
                token = object()
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(self._dial_one, rec, limiter, token)

    async def _dial_one(self, rec: PeerRecord, limiter: trio.CapacityLimiter, token: object) -> None:
        try:
            if self.node.is_connected(rec.peer_id):
                return
            self._stats["dials"] += 1
            await self.node.connect(rec.peer_id, list(rec.addrs), timeout=self.dial_timeout)
            log.debug("connected to announced peer %s", rec.peer_id)
        except Exception as e:
            self._stats["dial_failures"] += 1
            log.info("could not dial announced peer %s at %s: %s", rec.peer_id, list(rec.addrs), e)
        finally:
            limiter.release_on_behalf_of(token)


__all__ = ["Discovery", "topic_for"]
