"""PURE: peer announcement records, their wire codec, the expiring peer table, layer coverage.

No I/O and no clock reads except a table's default clock: every time-dependent method takes
``now`` (seconds on the table's clock, monotonic by default).

Wire format: one msgpack map. Required fields are top-level keys; anything new goes into
``extras`` (a map), so peers running older software keep decoding newer records. Unknown
top-level keys are ignored too. ``"v"`` is the schema version: a record with a higher version
is still accepted if its required fields validate (newer peers only add, never change meaning).

Bounds (values in :mod:`molinkd.limits`): the msgpack profile ``RECORD_MSG`` (64 KiB, no bins, no
ext types, the timestamp included, shallow); ``extras`` holds only str/int/float/bool/None/lists/
maps with string keys, at most ``RECORD_EXTRAS_MAX_BYTES`` and ``RECORD_EXTRAS_MAX_DEPTH`` deep,
so :meth:`PeerRecord.to_dict` is always JSON-serialisable (``/status`` cannot be broken by one
record). :func:`check_fresh` refuses records whose signed ``time`` is too old (replayed) or in the
future; :class:`PeerTable` holds at most ``max_per_ip`` peers per announced IP address.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgpack

from molinkd.limits import (
    RECORD_EXTRAS_MAX_BYTES,
    RECORD_EXTRAS_MAX_DEPTH,
    RECORD_MAX_AGE_TTLS,
    RECORD_MAX_FUTURE_SKEW,
    RECORD_MAX_PEERS_PER_IP,
    RECORD_MSG,
)
from p2p.framing import unpack

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = RECORD_MSG.max_frame  # a record with an RTT map for a few hundred peers fits
MAX_ADDRS = 32
MAX_STR = 512
MAX_LAYERS = 1_000_000
STATES = ("online", "offline")


class RecordError(ValueError):
    """A peer sent a record that is not valid (remote misbehaviour: drop it, log it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PeerRecord:
    """What one peer announces about itself. ``span_end`` is exclusive; ``(0, 0)`` = a gateway
    serving no layers. ``time`` is the sender's unix time (used only to order its own records).
    ``addrs`` is stored as a tuple (records are immutable and shared between snapshots)."""

    peer_id: str
    addrs: tuple[str, ...]
    model_name: str
    model_hash: str
    span_start: int
    span_end: int
    total_layers: int
    free_kv_blocks: int = 0
    throughput: float = 0.0  # tokens/s through the whole span at batch 1
    active_requests: int = 0
    version: str = ""
    time: float = 0.0
    state: str = "online"
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.addrs, tuple):
            object.__setattr__(self, "addrs", tuple(self.addrs))
        _validate(self)

    @property
    def online(self) -> bool:
        return self.state == "online"

    @property
    def is_gateway(self) -> bool:
        """Serves no layers (forwards HTTP requests only)."""
        return self.span_end <= self.span_start

    @property
    def span(self) -> tuple[int, int]:
        return (self.span_start, self.span_end)

    def replace(self, **changes: Any) -> PeerRecord:
        return dataclasses.replace(self, **changes)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.schema,
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "span_start": self.span_start,
            "span_end": self.span_end,
            "total_layers": self.total_layers,
            "free_kv_blocks": self.free_kv_blocks,
            "throughput": float(self.throughput),
            "active_requests": self.active_requests,
            "version": self.version,
            "time": float(self.time),
            "state": self.state,
            "extras": dict(self.extras),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for /status): extras are validated plain data (see
        :func:`check_extras`), copied so the caller may change the result."""
        d = self.to_wire()
        d.pop("v")
        d["schema"] = self.schema
        d["extras"] = _json_copy(self.extras)
        return d

    def ips(self) -> frozenset[str]:
        """Hosts this record announces (see :func:`addr_hosts`)."""
        return addr_hosts(self.addrs)


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "peer_id": str,
    "addrs": list,
    "model_name": str,
    "model_hash": str,
    "span_start": int,
    "span_end": int,
    "total_layers": int,
    "free_kv_blocks": int,
    "throughput": (int, float),
    "active_requests": int,
    "version": str,
    "time": (int, float),
    "state": str,
    "extras": dict,
}


def _validate(r: PeerRecord) -> None:
    def bad(msg: str) -> RecordError:
        return RecordError(f"record from {r.peer_id[:64]!r}: {msg}")

    for name in ("peer_id", "model_name", "model_hash", "version", "state"):
        v = getattr(r, name)
        if not isinstance(v, str) or len(v) > MAX_STR:
            raise bad(f"{name} must be a string of at most {MAX_STR} chars")
    if not r.peer_id:
        raise bad("empty peer_id")
    if len(r.addrs) > MAX_ADDRS or not all(isinstance(a, str) and 0 < len(a) <= MAX_STR for a in r.addrs):
        raise bad(f"addrs must be at most {MAX_ADDRS} non-empty strings")
    for name in ("span_start", "span_end", "total_layers", "free_kv_blocks", "active_requests", "schema"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= (1 << 53):
            raise bad(f"{name} must be a non-negative integer")
    if not 0 < r.total_layers <= MAX_LAYERS:
        raise bad(f"total_layers {r.total_layers} out of range")
    if not r.span_start <= r.span_end <= r.total_layers:
        raise bad(f"span [{r.span_start}, {r.span_end}) is not inside [0, {r.total_layers})")
    if r.span_start == r.span_end and r.span_start != 0:
        raise bad("an empty span must be written (0, 0)")
    for name in ("throughput", "time"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise bad(f"{name} must be a finite non-negative number")
    if r.state not in STATES:
        raise bad(f"state must be one of {STATES}, got {r.state[:32]!r}")
    try:
        check_extras(r.extras)
    except RecordError as e:
        raise bad(str(e)) from None
    if r.schema < 1:
        raise bad("schema version must be >= 1")


def check_extras(extras: Any) -> None:
    """``extras`` must be a map with string keys holding only str/int/float (finite)/bool/None,
    lists and maps with string keys, at most RECORD_EXTRAS_MAX_DEPTH deep and about
    RECORD_EXTRAS_MAX_BYTES big (msgpack size). Raises RecordError. Iterative: O(size)."""
    if not isinstance(extras, Mapping):
        raise RecordError("extras must be a map with string keys")
    size = 0
    todo: list[tuple[Any, int]] = [(extras, 1)]
    while todo:
        v, depth = todo.pop()
        t = type(v)
        if t is str:
            size += len(v) + 1
        elif v is None or t is bool:
            size += 1
        elif t is int:
            if not -(1 << 63) <= v < (1 << 64):
                raise RecordError("extras: integer out of the 64-bit range")
            size += 9
        elif t is float:
            if not math.isfinite(v):
                raise RecordError("extras: numbers must be finite")
            size += 9
        elif isinstance(v, (list, tuple)):
            if depth > RECORD_EXTRAS_MAX_DEPTH:
                raise RecordError(f"extras nest deeper than {RECORD_EXTRAS_MAX_DEPTH} levels")
            size += 5
            todo.extend((x, depth + 1) for x in v)
        elif isinstance(v, Mapping):
            if depth > RECORD_EXTRAS_MAX_DEPTH:
                raise RecordError(f"extras nest deeper than {RECORD_EXTRAS_MAX_DEPTH} levels")
            size += 5
            for k, x in v.items():
                if type(k) is not str:
                    raise RecordError("extras: map keys must be strings")
                size += len(k) + 1
                todo.append((x, depth + 1))
        else:
            raise RecordError(f"extras: values of type {t.__name__} are not allowed (only str, int, float, "
                              "bool, None, lists and maps)")
        if size > RECORD_EXTRAS_MAX_BYTES:
            raise RecordError(f"extras are over {RECORD_EXTRAS_MAX_BYTES} bytes")


def _json_copy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _json_copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_copy(x) for x in v]
    return v


def addr_hosts(addrs: Iterable[str]) -> frozenset[str]:
    """The hosts (IPv4/IPv6 address or DNS name) of direct multiaddrs such as
    ``/ip4/1.2.3.4/tcp/4001``; relayed addresses (``/p2p-circuit``) name the relay, not the peer,
    and are skipped. IPv6 addresses are normalised."""
    import ipaddress

    out = set()
    for a in addrs:
        if "/p2p-circuit" in a:
            continue
        parts = a.split("/")
        if len(parts) >= 3 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"):
            host = parts[2].lower()
            if parts[1] in ("ip4", "ip6"):
                try:
                    host = str(ipaddress.ip_address(host))
                except ValueError:
                    continue
            out.add(host)
    return frozenset(out)


def check_fresh(rec: PeerRecord, wall_now: float, max_age: float,
                max_future: float = RECORD_MAX_FUTURE_SKEW) -> str | None:
    """None if the record's signed ``time`` (sender's unix time) is within
    ``[wall_now - max_age, wall_now + max_future]`` (receiver's unix time); otherwise "old" (a
    replay, or a sender whose clock is far behind) or "future"."""
    if rec.time < wall_now - max_age:
        return "old"
    if rec.time > wall_now + max_future:
        return "future"
    return None


def encode_record(rec: PeerRecord) -> bytes:
    """msgpack bytes of a record. Raises RecordError if over MAX_RECORD_BYTES or not encodable."""
    try:
        data = msgpack.packb(rec.to_wire(), use_bin_type=True)
    except Exception as e:  # an extras value msgpack cannot encode
        raise RecordError(f"cannot encode record: {type(e).__name__}: {e}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit (trim extras)")
    return data


def decode_record(data: bytes | bytearray | memoryview) -> PeerRecord:
    """Parse and validate one record. Raises RecordError (never anything else) on bad input."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(data)} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    obj = unpack(data, RECORD_MSG, RecordError)
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a map, got {type(obj).__name__}")
    schema = obj.get("v")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise RecordError("record has no valid schema version 'v'")
    kwargs: dict[str, Any] = {"schema": schema}
    for name, kind in _FIELDS.items():
        if name not in obj:
            if name in ("extras",):
                continue
            raise RecordError(f"record is missing field {name!r}")
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, kind):
            raise RecordError(f"record field {name!r} has type {type(v).__name__}")
        kwargs[name] = v
    kwargs["addrs"] = tuple(kwargs["addrs"])
    kwargs["throughput"] = float(kwargs["throughput"])
    kwargs["time"] = float(kwargs["time"])
    try:
        return PeerRecord(**kwargs)
    except RecordError:
        raise
    except Exception as e:
        raise RecordError(f"invalid record ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------- table


@dataclasses.dataclass(slots=True)
class _Entry:
    record: PeerRecord
    expires: float  # on the table's clock


class PeerTable:
    """Latest record per peer, expiring ``ttl`` seconds after it was last renewed.

    Expiry is measured on the receiver's clock (``now``), never on the sender's ``time``
    (clocks differ between machines); the sender's ``time`` only orders that sender's own
    records, so a replayed or reordered older record never overwrites a newer one. An offline
    record removes the peer at once and leaves a tombstone (for ``tombstone_ttl``, default
    ``RECORD_MAX_AGE_TTLS * ttl``: as long as a replayed record stays fresh for
    :func:`check_fresh`) so a delayed or replayed older online record cannot bring it back.
    ``max_peers`` bounds memory: a new peer beyond it is refused. ``max_per_ip`` bounds the
    peers announcing one IP address (direct addresses only): an attacker minting peer ids cannot
    fill the table, nor point every peer's dialer at one victim address more than that many times.
    """

    def __init__(self, ttl: float, *, max_peers: int = 10_000, max_per_ip: int = RECORD_MAX_PEERS_PER_IP,
                 tombstone_ttl: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_per_ip < 1:
            raise ValueError("max_per_ip must be >= 1")
        self.ttl = ttl
        self.tombstone_ttl = tombstone_ttl if tombstone_ttl is not None else RECORD_MAX_AGE_TTLS * ttl
        self.max_peers = max_peers
        self.max_per_ip = max_per_ip
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tombstones: dict[str, tuple[float, float]] = {}  # peer -> (record time, expires)
        self._by_ip: dict[str, set[str]] = {}  # announced host -> peers in _entries announcing it

    def update(self, rec: PeerRecord, now: float | None = None) -> str:
        """Apply one record. Returns what happened: "added", "renewed", "removed" (offline),
        "stale" (older than what we hold, or than the peer's offline tombstone), "full",
        "ip_full" (one of its addresses already has ``max_per_ip`` other peers)."""
        now = self.clock() if now is None else now
        cur = self._entries.get(rec.peer_id)
        if cur is not None and rec.time < cur.record.time:
            return "stale"
        tomb = self._tombstones.get(rec.peer_id)
        if tomb is not None:
            if tomb[1] <= now:
                del self._tombstones[rec.peer_id]
            elif rec.time <= tomb[0]:
                return "stale"
        if not rec.online:
            self._drop(rec.peer_id)
            self._tombstones[rec.peer_id] = (rec.time, now + self.tombstone_ttl)
            return "removed"
        self._tombstones.pop(rec.peer_id, None)
        if cur is None and len(self._entries) >= self.max_peers:
            self.expire(now)
            if len(self._entries) >= self.max_peers:
                return "full"
        hosts = rec.ips()
        old_hosts = cur.record.ips() if cur is not None else frozenset()
        new_hosts = hosts - old_hosts
        if any(len(self._by_ip.get(h, ())) >= self.max_per_ip for h in new_hosts):
            self.expire(now)
            if any(len(self._by_ip.get(h, ())) >= self.max_per_ip for h in new_hosts):
                return "ip_full"
        for h in old_hosts - hosts:
            self._unindex(h, rec.peer_id)
        for h in new_hosts:
            self._by_ip.setdefault(h, set()).add(rec.peer_id)
        self._entries[rec.peer_id] = _Entry(rec, now + self.ttl)
        return "added" if cur is None else "renewed"

    def _unindex(self, host: str, peer_id: str) -> None:
        peers = self._by_ip.get(host)
        if peers is not None:
            peers.discard(peer_id)
            if not peers:
                del self._by_ip[host]

    def _drop(self, peer_id: str) -> bool:
        e = self._entries.pop(peer_id, None)
        if e is None:
            return False
        for h in e.record.ips():
            self._unindex(h, peer_id)
        return True

    def peers_at(self, host: str) -> int:
        """Number of peers in the table announcing ``host``."""
        return len(self._by_ip.get(host, ()))

    def expire(self, now: float | None = None) -> list[str]:
        """Drop entries not renewed in time; return the peer ids dropped."""
        now = self.clock() if now is None else now
        gone = [p for p, e in self._entries.items() if e.expires <= now]
        for p in gone:
            self._drop(p)
        for p in [p for p, (_, exp) in self._tombstones.items() if exp <= now]:
            del self._tombstones[p]
        return gone

    def remove(self, peer_id: str) -> bool:
        return self._drop(peer_id)

    def get(self, peer_id: str, now: float | None = None) -> PeerRecord | None:
        now = self.clock() if now is None else now
        e = self._entries.get(peer_id)
        return e.record if e is not None and e.expires > now else None

    def snapshot(self, now: float | None = None) -> list[PeerRecord]:
        """Live records (not expired at ``now``), sorted by (span_start, span_end, peer_id)."""
        now = self.clock() if now is None else now
        recs = [e.record for e in self._entries.values() if e.expires > now]
        recs.sort(key=lambda r: (r.span_start, r.span_end, r.peer_id))
        return recs

    def peer_ids(self, now: float | None = None) -> list[str]:
        return [r.peer_id for r in self.snapshot(now)]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries


# ----------------------------------------------------------------------------------- coverage


@dataclasses.dataclass(frozen=True, slots=True)
class Coverage:
    """Which layers of ``[0, total_layers)`` the live peers serve.

    ``replicas[i]`` = number of peers serving layer i; ``intervals`` = merged served ranges;
    ``gaps`` = unserved ranges; ``chain`` = True when some sequence of spans, each starting
    exactly where the previous ended, goes from 0 to ``total_layers`` (stages compute their
    whole span, so overlapping-but-misaligned spans cover the layers without forming a route).
    """

    total_layers: int
    replicas: tuple[int, ...]
    intervals: tuple[tuple[int, int], ...]
    gaps: tuple[tuple[int, int], ...]
    chain: bool

    @property
    def complete(self) -> bool:
        return not self.gaps

    @property
    def min_replicas(self) -> int:
        return min(self.replicas) if self.replicas else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_layers": self.total_layers,
            "complete": self.complete,
            "chain": self.chain,
            "intervals": [list(i) for i in self.intervals],
            "gaps": [list(g) for g in self.gaps],
            "min_replicas": self.min_replicas,
        }


def coverage(records: Iterable[PeerRecord], total_layers: int, model_hash: str | None = None) -> Coverage:
    """Coverage of ``[0, total_layers)`` by online, non-gateway records (with the same
    ``total_layers`` and, if given, ``model_hash``)."""
    if total_layers <= 0:
        raise ValueError("total_layers must be positive")
    spans = sorted(
        {
            (r.span_start, r.span_end)
            for r in records
            if r.online
            and not r.is_gateway
            and r.total_layers == total_layers
            and (model_hash is None or r.model_hash == model_hash)
        }
    )
    # difference array: O(peers + layers)
    diff = [0] * (total_layers + 1)
    count: dict[tuple[int, int], int] = {}
    for r in records:
        if r.online and not r.is_gateway and r.total_layers == total_layers and (model_hash is None or r.model_hash == model_hash):
            count[(r.span_start, r.span_end)] = count.get((r.span_start, r.span_end), 0) + 1
    for (s, e), n in count.items():
        diff[s] += n
        diff[e] -= n
    replicas, run = [], 0
    for i in range(total_layers):
        run += diff[i]
        replicas.append(run)
    intervals, gaps = runs(replicas, lambda n: n > 0), runs(replicas, lambda n: n == 0)
    # chain: reachability over span boundaries starting from 0
    reach = {0}
    for s, e in spans:  # sorted by start, so every s is final when reached
        if s in reach:
            reach.add(e)
    return Coverage(total_layers, tuple(replicas), intervals, gaps, total_layers in reach)


def runs(values: Sequence[Any], pred: Callable[[Any], bool]) -> tuple[tuple[int, int], ...]:
    """Half-open ``(start, end)`` index ranges where ``pred(values[i])`` holds (gaps, intervals)."""
    out: list[tuple[int, int]] = []
    start = None
    for i, v in enumerate(values):
        if pred(v):
            if start is None:
                start = i
        elif start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(values)))
    return tuple(out)


__all__ = [
    "runs",
    "Coverage",
    "MAX_RECORD_BYTES",
    "PeerRecord",
    "PeerTable",
    "RecordError",
    "SCHEMA_VERSION",
    "addr_hosts",
    "check_extras",
    "check_fresh",
    "coverage",
    "decode_record",
    "encode_record",
]
