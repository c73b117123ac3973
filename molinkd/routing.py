"""Route planning: which chain of peers serves layers ``[0, L)`` for one head.

PURE: works on snapshots of peer records, no I/O. The head always runs its own span first
(it owns layer 0 and the scheduler); the rest of the chain is a shortest path over layer
boundaries where an edge is "peer p runs layers [a, b)" (a chain may only enter a peer at the
peer's own span start: vLLM stages compute exactly their announced span).

Edge cost (seconds per decode step) = rtt/2 from the previous hop + compute of the span, where
compute = ``(1 + load) / throughput``: ``throughput`` is the tokens/s the peer announces for its
whole span at batch 1 and ``load`` its queue occupancy (0 idle, 1 saturated). Peers with another
model hash are never mixed in; banned peers are skipped.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence


class NoRouteError(LookupError):
    """No chain of live, compatible peers covers the model (say which layers are missing)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PeerRecord:
    peer_id: str
    span_start: int
    span_end: int
    throughput: float  # tokens/s through the peer's whole span at batch 1 (> 0)
    load: float = 0.0  # 0 = idle, 1 = saturated
    rtt: float | None = None  # seconds, round trip from the previous hop (None: unknown)
    model_hash: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    hops: tuple[PeerRecord, ...]  # head first
    cost: float  # expected seconds per step

    @property
    def peer_ids(self) -> list[str]:
        return [h.peer_id for h in self.hops]

    def spans(self) -> list[tuple[int, int]]:
        return [(h.span_start, h.span_end) for h in self.hops]


DEFAULT_RTT = 0.05  # seconds assumed for peers we never measured


def compute_cost(p: PeerRecord) -> float:
    if p.throughput <= 0 or not math.isfinite(p.throughput):
        return math.inf
    return (1.0 / p.throughput) * (1.0 + max(p.load, 0.0))


def hop_cost(p: PeerRecord, rtts: Mapping[str, float] | None = None, default_rtt: float = DEFAULT_RTT) -> float:
    rtt = (rtts or {}).get(p.peer_id, p.rtt)
    if rtt is None:
        rtt = default_rtt
    return rtt / 2.0 + compute_cost(p)


def plan_route(
    head: PeerRecord,
    peers: Iterable[PeerRecord],
    num_layers: int,
    *,
    banned: Iterable[str] = (),
    rtts: Mapping[str, float] | None = None,
    default_rtt: float = DEFAULT_RTT,
) -> Route:
    """Cheapest chain covering ``[0, num_layers)`` exactly, starting with ``head``.

    Only peers with ``head.model_hash`` are used; ``banned`` peer ids are skipped; ``rtts``
    overrides each record's ``rtt`` (e.g. freshly measured). Raises NoRouteError naming the
    first layer nobody reachable serves.
    """
    if head.span_start != 0:
        raise ValueError(f"the head must own layer 0, its span is {head.span_start}:{head.span_end}")
    if not 0 < head.span_end <= num_layers:
        raise ValueError(f"head span end {head.span_end} outside 1..{num_layers}")
    banned_set = set(banned)
    by_start: dict[int, list[PeerRecord]] = {}
    for p in peers:
        if p.peer_id == head.peer_id or p.peer_id in banned_set:
            continue
        if p.model_hash != head.model_hash:
            continue
        if not (0 <= p.span_start < p.span_end <= num_layers):
            continue
        if compute_cost(p) == math.inf:
            continue
        by_start.setdefault(p.span_start, []).append(p)

    head_cost = compute_cost(head)
    if head.span_end == num_layers:
        return Route((head,), head_cost)

    # Dijkstra over layer boundaries; ties broken by fewer hops, then peer id (deterministic)
    best: dict[int, tuple[float, int]] = {head.span_end: (head_cost, 1)}
    prev: dict[int, tuple[int, PeerRecord]] = {}
    heap: list[tuple[float, int, int]] = [(head_cost, 1, head.span_end)]
    while heap:
        cost, nhops, pos = heapq.heappop(heap)
        if best.get(pos, (math.inf, 0)) < (cost, nhops):
            continue
        if pos == num_layers:
            break
        for p in sorted(by_start.get(pos, ()), key=lambda r: r.peer_id):
            c = cost + hop_cost(p, rtts, default_rtt)
            key = (c, nhops + 1)
            if key < best.get(p.span_end, (math.inf, 0)):
                best[p.span_end] = key
                prev[p.span_end] = (pos, p)
                heapq.heappush(heap, (c, nhops + 1, p.span_end))

    if num_layers not in best:
        reach = max(best)
        raise NoRouteError(
            f"no live peer with model {head.model_hash[:12] or '?'} serves a span starting at layer "
            f"{_first_hole(best, by_start, num_layers)} (reachable up to layer {reach} of {num_layers})"
        )
    hops: list[PeerRecord] = []
    pos = num_layers
    while pos != head.span_end:
        pos, p = prev[pos]
        hops.append(p)
    hops.append(head)
    hops.reverse()
    return Route(tuple(hops), best[num_layers][0])


def _first_hole(best: Mapping[int, tuple[float, int]], by_start: Mapping[int, Sequence[PeerRecord]], n: int) -> int:
    for pos in sorted(best):
        if pos != n and not by_start.get(pos):
            return pos
    return max(best)


def route_to_dicts(route: Route, addrs: Mapping[str, str] | None = None) -> list[dict]:
    """The route as the engine's session wants it: ``[{peer, start, end, addr}]``."""
    return [
        {"peer": h.peer_id, "start": h.span_start, "end": h.span_end, "addr": (addrs or {}).get(h.peer_id, "")}
        for h in route.hops
    ]
