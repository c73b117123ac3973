"""PURE: peer announcement records, their wire codec, the expiring peer table, layer coverage.

No I/O and no clock reads except a table's default clock: every time-dependent method takes
``now`` (seconds on the table's clock, monotonic by default).

Wire format: one msgpack map. Required fields are top-level keys; anything new goes into
``extras`` (a map), so peers running older software keep decoding newer records. Unknown
top-level keys are ignored too. ``"v"`` is the schema version: a record with a higher version
is still accepted if its required fields validate (newer peers only add, never change meaning).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgpack

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024  # a record with an RTT map for a few hundred peers fits
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
        """JSON-friendly form (for /status)."""
        d = self.to_wire()
        d.pop("v")
        d["schema"] = self.schema
        return d


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
    if not isinstance(r.extras, Mapping) or not all(isinstance(k, str) for k in r.extras):
        raise bad("extras must be a map with string keys")
    if r.schema < 1:
        raise bad("schema version must be >= 1")


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
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
        )
    except RecordError:
        raise
    except Exception as e:
        raise RecordError(f"undecodable record ({type(e).__name__}: {e})") from None
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


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RecordError(f"msgpack extension type {code} is not allowed in records")


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
    record removes the peer at once and leaves a tombstone (for ``ttl``) so a delayed older
    online record cannot bring it back. ``max_peers`` bounds memory: a new peer beyond it is
    refused.
    """

    def __init__(self, ttl: float, *, max_peers: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl
        self.max_peers = max_peers
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._tombstones: dict[str, tuple[float, float]] = {}  # peer -> (record time, expires)

    def update(self, rec: PeerRecord, now: float | None = None) -> str:
        """Apply one record. Returns what happened: "added", "renewed", "removed" (offline),
        "stale" (older than what we hold, or than the peer's offline tombstone), "full"."""
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
            self._entries.pop(rec.peer_id, None)
            self._tombstones[rec.peer_id] = (rec.time, now + self.ttl)
            return "removed"
        self._tombstones.pop(rec.peer_id, None)
        if cur is None and len(self._entries) >= self.max_peers:
            self.expire(now)
            if len(self._entries) >= self.max_peers:
                return "full"
        self._entries[rec.peer_id] = _Entry(rec, now + self.ttl)
        return "added" if cur is None else "renewed"

    def expire(self, now: float | None = None) -> list[str]:
        """Drop entries not renewed in time; return the peer ids dropped."""
        now = self.clock() if now is None else now
        gone = [p for p, e in self._entries.items() if e.expires <= now]
        for p in gone:
            del self._entries[p]
        for p in [p for p, (_, exp) in self._tombstones.items() if exp <= now]:
            del self._tombstones[p]
        return gone

    def remove(self, peer_id: str) -> bool:
        return self._entries.pop(peer_id, None) is not None

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
    "coverage",
    "decode_record",
    "encode_record",
]
