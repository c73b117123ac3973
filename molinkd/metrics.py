"""What an operator sees of a daemon: Prometheus metrics, readiness, and the event log lines.

One :class:`Metrics` object per daemon owns one ``CollectorRegistry`` (never prometheus-client's
global one: tests run several apps in one process). ``/metrics`` renders it; ``/status`` reads its
counters (``resumed_requests``, ``requests``). Two kinds of series live in it:

- **events**, counted when they happen: requests by endpoint and outcome, tokens in and out,
  time to first token, inter-token latency, resumed requests, bans, route changes, peers joining
  and leaving. Each event that an operator wants to hear about also writes exactly one log line
  (logger ``molinkd.events``, shown at the default log level), so the log and the counters
  cannot disagree;
- **state**, read from the daemon at scrape time by :class:`DaemonCollector`: peers known, layer
  coverage and the largest gap, the route's per-stage step time, RTT and bytes per peer, KV cache,
  NAT (relays, hole punches), bans in force, and vLLM's own engine metrics when the engine
  records them.

:func:`readiness` is the pure rule behind ``GET /ready``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from molinkd import logs

log = logging.getLogger("molinkd.metrics")
events_log = logging.getLogger("molinkd.events")

GEN_ENDPOINTS = ("/generate", "/v1/completions", "/v1/chat/completions")
# seconds; TTFT on CPU runs from ~50 ms (short prompt, idle) to tens of seconds (queued behind a batch)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_PEER_LABELS = 64  # per-peer series kept (bytes of peers gone are folded into peer="other")


def outcome_of(status: int) -> str:
    """Request outcome label from the HTTP status the client got (or would have got)."""
    if status < 400:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 503:
        return "unavailable"
    if status < 500:
        return "rejected"
    return "error"


def short(peer: str | None) -> str:
    return (peer or "-")[:16]


class Metrics:
    """The daemon's registry, its event counters, and the event log lines."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody reads them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peer_id = ""  # set once the node runs: event lines carry it
        self.requests = Counter("molink_requests", "HTTP generation requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("molink_prompt_tokens", "Prompt tokens of requests served", registry=r)
        self.generation_tokens = Counter("molink_generation_tokens", "Tokens generated for clients", registry=r)
        self.ttft = Histogram("molink_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token (streamed requests)",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("molink_inter_token_latency_seconds",
                             "Time between generated tokens of one choice (streamed requests)",
                             buckets=ITL_BUCKETS, registry=r)
        self.duration = Histogram("molink_request_duration_seconds", "Whole generation requests, arrival to end",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.resumed = Counter("molink_resumed_requests",
                               "Requests that lost their engine or head and continued on another", registry=r)
        self.bans = Counter("molink_bans", "Peers excluded from routes (each ban counts)", registry=r)
        self.route_changes = Counter("molink_route_changes", "Routes chosen by this head (first and later)",
                                     registry=r)
        self.peer_joins = Counter("molink_peer_joins", "Peers that appeared in the peer table", registry=r)
        self.peer_leaves = Counter("molink_peer_leaves", "Peers that left the table (goodbye or expiry)",
                                   ["reason"], registry=r)
        self.audits = Counter("molink_audits", "Spot checks of this head's remote stages, by outcome "
                              "(agree, disagree, skipped: no verifier route or it failed)", ["outcome"], registry=r)
        for outcome in ("agree", "disagree", "skipped"):
            self.audits.labels(outcome=outcome)

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def counter_value(self, c: Counter) -> float:
        return sum(s.value for m in c.collect() for s in m.samples if s.name.endswith("_total"))

    def summary(self) -> dict:
        """The event counters for /status."""
        by: dict[str, dict[str, int]] = {}
        for m in self.requests.collect():
            for s in m.samples:
                if s.name.endswith("_total"):
                    by.setdefault(s.labels["endpoint"], {})[s.labels["outcome"]] = int(s.value)
        return {"requests": by,
                "prompt_tokens": int(self.counter_value(self.prompt_tokens)),
                "generation_tokens": int(self.counter_value(self.generation_tokens)),
                "resumed_requests": int(self.counter_value(self.resumed)),
                "bans": int(self.counter_value(self.bans))}

    # -- events ------------------------------------------------------------------------------

    def _event(self, level: int, msg: str, **fields: Any) -> None:
        events_log.log(level, msg, extra=logs.kv(**fields, me=self.peer_id))

    def peer_joined(self, peer: str, span: tuple[int, int], role: str | None) -> None:
        self.peer_joins.inc()
        self._event(logging.INFO, "peer joined", peer=peer, span=f"{span[0]}:{span[1]}", role=role or "?")

    def peer_left(self, peer: str, reason: str) -> None:
        self.peer_leaves.labels(reason=reason).inc()
        self._event(logging.INFO, "peer left", peer=peer, reason=reason)

    def route_chosen(self, hops: list[dict], previous: list[dict] | None) -> None:
        self.route_changes.inc()
        desc = " -> ".join(f"{h['peer']}[{h['start']}:{h['end']})" for h in hops)
        if previous is None:
            self._event(logging.INFO, "route chosen", route=desc)
        else:
            old = " -> ".join(f"{h['peer']}[{h['start']}:{h['end']})" for h in previous)
            self._event(logging.INFO, "route changed", route=desc, previous=old)

    def banned(self, peer: str, seconds: float, reason: str) -> None:
        self.bans.inc()
        self._event(logging.WARNING, "peer banned from routes", peer=peer, seconds=seconds, reason=reason)

    def audited(self, outcome: str, *, blamed: list[str], verifiers: list[str], detail: str) -> None:
        """Count an audit; a disagreement is an event line (agreements and skips log at debug)."""
        self.audits.labels(outcome=outcome).inc()
        if outcome == "disagree":
            self._event(logging.WARNING, "audit disagreed: a stage returned wrong values", blamed=",".join(blamed),
                        verifiers=",".join(verifiers), detail=detail)
        else:
            log.debug("audit %s", outcome, extra=logs.kv(blamed=",".join(blamed), verifiers=",".join(verifiers),
                                                         detail=detail))

    def audit_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.audits.collect():
            for s in m.samples:
                if s.name.endswith("_total"):
                    out[s.labels["outcome"]] = int(s.value)
        return out

    def request_resumed(self, endpoint: str, request_id: str, error: str, generated: int, attempt: int) -> None:
        self.resumed.inc()
        self._event(logging.WARNING, "request resumed on another backend", endpoint=endpoint,
                    request_id=request_id, generated=generated, attempt=attempt, error=error)

    def request_done(self, endpoint: str, status: int, *, request_id: str = "", error: str = "") -> None:
        """Count a finished request; a failure that is not the client's writes one log line."""
        outcome = outcome_of(status)
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()
        if status >= 500:
            self._event(logging.WARNING, "request failed", endpoint=endpoint, request_id=request_id,
                        status=status, error=error)

    async def track(self, endpoint: str, request_id: str, events: AsyncIterator[dict], t0: float,
                    stream: bool) -> AsyncIterator[dict]:
        """Pass ``events`` through, observing tokens and latencies; count the outcome at the end.
        TTFT and inter-token latency come from streamed requests only (a non-streamed request's
        engine sends its tokens once, at the end)."""
        from molinkd.protocol import APIError

        first_token = True
        last: dict[int, float] = {}
        status, error = 200, ""
        try:
            async for ev in events:
                kind = ev.get("ev")
                if kind == "delta":
                    n = len(ev.get("token_ids") or ())
                    if n:
                        now = time.monotonic()
                        self.generation_tokens.inc(n)
                        if stream:
                            if first_token:
                                self.ttft.observe(now - t0)
                                first_token = False
                            i = ev.get("index", 0)
                            if i in last:
                                gap = (now - last[i]) / n
                                for _ in range(n):
                                    self.itl.observe(gap)
                            last[i] = now
                elif kind == "start":
                    self.prompt_tokens.inc(int(ev.get("prompt_tokens") or 0))
                yield ev
        except APIError as e:
            status, error = e.status, e.message
            raise
        except GeneratorExit:
            status, error = 499, "the client went away"
            raise
        except BaseException as e:
            status, error = (499, "cancelled") if _is_cancel(e) else (500, f"{type(e).__name__}: {e}")
            raise
        finally:
            if status == 499:
                self.requests.labels(endpoint=endpoint, outcome="cancelled").inc()
            else:
                self.request_done(endpoint, status, request_id=request_id, error=error)
            self.duration.observe(time.monotonic() - t0)


def _is_cancel(e: BaseException) -> bool:
    import trio

    return isinstance(e, trio.Cancelled)


# ------------------------------------------------------------------------------- readiness


def readiness(*, role: str, engine_state: str, engine_error: str | None, serving: bool,
              route_error: str | None, gaps: Iterable[tuple[int, int]] | None, peers_known: int) -> tuple[bool, str]:
    """Would a generate request sent now be served? ``(True, "ready")`` or ``(False, reason)``.

    ``serving``: a backend is there (own engine up, or a head reachable); ``gaps``: layer ranges
    nobody in the peer table serves (None if unknown)."""
    if serving:
        return True, "ready"
    gap_list = list(gaps or ())
    uncovered = ("no route: layers " + ", ".join(f"{s}:{e}" for s, e in gap_list) + " uncovered") if gap_list else ""
    if role == "choosing":
        return False, "choosing a span (--layers auto listens to the swarm first)"
    if role in ("full", "head") and engine_state == "loading":
        return False, "engine loading"
    if role in ("full", "head") and engine_state in ("restarting", "failed", "stopped"):
        return False, f"engine {engine_state}" + (f": {engine_error}" if engine_error else "")
    if role == "head" and route_error:
        return False, uncovered or f"no route: {route_error}"
    if role in ("full", "head"):
        return False, f"engine {engine_state}"
    # gateways and stages forward to heads
    if uncovered:
        return False, uncovered
    if peers_known == 0:
        return False, "no peers: not connected to a swarm serving this model (check --bootstrap)"
    return False, "no head ready yet (a head is loading its engine or waiting for a route)"


# --------------------------------------------------------------------- state, read at scrape

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, u64 in host byte order at
# bytes 120 and 128 (Linux >= 4.1; older kernels return a shorter struct and we report nothing)
_TCP_INFO = getattr(socket, "TCP_INFO", None)


def _tcp_bytes(sock: Any) -> tuple[int, int] | None:
    if _TCP_INFO is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 136)
    except (OSError, ValueError, AttributeError):
        return None
    if len(raw) < 136:
        return None
    sent, received = struct.unpack_from("=QQ", raw, 120)
    return sent, received


def _find_socket(obj: Any, depth: int = 0) -> Any:
    """The OS socket under a py-libp2p connection (muxer -> security -> raw -> trio stream)."""
    if obj is None or depth > 8:
        return None
    if hasattr(obj, "getsockopt") and hasattr(obj, "fileno"):
        return obj
    for attr in ("muxed_conn", "secured_conn", "conn", "read_writer", "stream", "socket", "_conn", "raw_conn"):
        sub = getattr(obj, attr, None)
        if sub is not None and sub is not obj:
            found = _find_socket(sub, depth + 1)
            if found is not None:
                return found
    return None


class PeerBytes:
    """Bytes sent and received per peer, from the kernel's counters of each TCP connection
    (``TCP_INFO``): exact for direct connections, whatever protocol runs on them. Connections
    that closed keep their last reading (taken at the previous scrape or sample) so counters never
    go back; peers beyond ``MAX_PEER_LABELS`` fold into ``peer="other"``."""

    def __init__(self) -> None:
        self._live: dict[tuple[str, int], tuple[int, int]] = {}  # (peer, fd) -> last reading
        self._closed: dict[str, list[int]] = {}

    def sample(self, host: Any) -> tuple[dict[str, tuple[int, int]], set[str]]:
        """``({peer: (sent, received)}, peers reached only through a relay)``."""
        seen: dict[tuple[str, int], tuple[int, int]] = {}
        relayed: set[str] = set()
        try:
            conns = list(host.get_network().connections.items())
        except Exception:
            conns = []
        for pid, cs in conns:
            peer = pid.to_base58() if hasattr(pid, "to_base58") else str(pid)
            direct = False
            for c in cs if isinstance(cs, list) else [cs]:
                sock = _find_socket(c)
                reading = _tcp_bytes(sock) if sock is not None else None
                if reading is None:
                    continue
                direct = True
                seen[(peer, sock.fileno())] = reading
            if not direct:
                relayed.add(peer)
        for key, reading in self._live.items():
            now = seen.get(key)
            # gone, or its fd now belongs to a newer connection (counters went back): fold it
            if now is None or now[0] < reading[0] or now[1] < reading[1]:
                acc = self._closed.setdefault(key[0], [0, 0])
                acc[0] += reading[0]
                acc[1] += reading[1]
        self._live = seen
        if len(self._closed) > MAX_PEER_LABELS:
            other = self._closed.pop("other", [0, 0])
            for p in list(self._closed)[: len(self._closed) - MAX_PEER_LABELS + 1]:
                v = self._closed.pop(p)
                other[0] += v[0]
                other[1] += v[1]
            self._closed["other"] = other
        totals = {p: (v[0], v[1]) for p, v in self._closed.items()}
        for (peer, _), (s, r) in seen.items():
            a, b = totals.get(peer, (0, 0))
            totals[peer] = (a + s, b + r)
        return totals, relayed


def _gauge(name: str, doc: str, value: float | None = None, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value, labels=labels)


class DaemonCollector:
    """Reads a running :class:`molinkd.service.Daemon` (duck-typed) at every scrape."""

    def __init__(self, d: Any) -> None:
        self.d = d
        self.bytes = PeerBytes()

    def describe(self) -> list:
        return []  # unchecked collector: its series depend on the swarm

    def collect(self) -> Iterable[Metric]:
        # one failing part (a peer's odd record, a libp2p internal that moved) must not cost the
        # scrape: each part is collected whole or dropped, with a warning
        for part in (self._peer, self._swarm, self._route, self._engine, self._nat):
            try:
                got = list(part(self.d))
            except Exception as e:  # noqa: BLE001
                log.warning("metrics: %s failed: %s: %s", part.__name__, type(e).__name__, e)
                continue
            yield from got
        yield from _vllm_metrics()

    def _peer(self, d: Any) -> Iterable[Metric]:
        ready, _ = d.readiness()
        info = _gauge("molink_info", "This peer (value 1)", labels=["peer_id", "role", "model", "version"])
        from molinkd import __version__

        info.add_metric([d.node.peer_id if d.node else "", d.role, d.model.name, __version__], 1)
        yield info
        yield _gauge("molink_ready", "1 when a generate request sent now would be served (see /ready)", float(ready))
        st = _gauge("molink_engine_state", "This peer's engine state (value 1 on the current one)", labels=["state"])
        st.add_metric([str(d.engine_state)], 1)
        yield st
        b, remote = d.backend, d.remote
        yield _gauge("molink_active_requests", "Requests in flight on this peer",
                     (b.active if b else 0) + (remote.active if remote else 0))
        yield _gauge("molink_throughput_tokens_per_second", "Tokens generated per second (30 s window)",
                     b.throughput.rate() if b else 0.0)

    def _swarm(self, d: Any) -> Iterable[Metric]:
        from p2p.records import coverage

        me = d.node.peer_id if d.node else None
        snapshot = [r for r in (d.disc.snapshot() if d.disc else []) if r.online and r.peer_id != me]
        yield _gauge("molink_peers_known", "Online peers in the peer table (serving this model; not counting us)",
                     len(snapshot))
        yield _gauge("molink_peers_connected", "Peers with an open libp2p connection",
                     len(d.node.connected_peers()) if d.node else 0)
        total = d.model.num_layers
        recs = snapshot + ([d.self_record()] if d.span[1] > 0 and d.node else [])
        cov = coverage(recs, total, d.model.model_hash) if recs else None
        covered = sum(1 for n in cov.replicas if n > 0) if cov else 0
        gaps = cov.gaps if cov else ((0, total),)
        yield _gauge("molink_model_layers", "Layers of the model (L)", total)
        yield _gauge("molink_layers_covered", "Layers of [0, L) some online peer serves", covered)
        yield _gauge("molink_largest_gap_layers", "Size of the largest run of layers nobody serves",
                     max((e - s for s, e in gaps), default=0))
        yield _gauge("molink_min_layer_replicas", "Fewest peers serving any one layer", cov.min_replicas if cov else 0)
        rtt = _gauge("molink_peer_rtt_seconds", "libp2p ping round trip per peer", labels=["peer"])
        for p, v in list(d.rtts.items()):
            rtt.add_metric([p], v)
        yield rtt
        sent = CounterMetricFamily("molink_peer_sent_bytes", "Bytes sent to a peer (TCP, direct connections)",
                                   labels=["peer"])
        recv = CounterMetricFamily("molink_peer_received_bytes", "Bytes received from a peer (TCP, direct connections)",
                                   labels=["peer"])
        relayed: set[str] = set()
        if d.node is not None:
            totals, relayed = self.bytes.sample(d.node.host)
            for p, (s, r) in sorted(totals.items()):
                sent.add_metric([p], s)
                recv.add_metric([p], r)
        yield sent
        yield recv
        yield _gauge("molink_relayed_peers", "Peers connected only through a circuit relay", len(relayed))
        active = [p for p, (until, _, _) in list(d.banned.items()) if until > time.monotonic()]
        yield _gauge("molink_banned_peers", "Peers currently excluded from routes", len(active))
        ds = d.disc.stats if d.disc else {}
        dropped = CounterMetricFamily("molink_discovery_dropped_records",
                                      "Peer announcements refused, by reason", labels=["reason"])
        for k in ("dropped_bad", "dropped_foreign_model", "dropped_forged"):
            dropped.add_metric([k.removeprefix("dropped_")], ds.get(k, 0))
        yield dropped

    def _route(self, d: Any) -> Iterable[Metric]:
        stages, pipeline = d.route_stats()
        yield _gauge("molink_route_stages", "Stages in this head's route (0: no route)", len(stages))
        step = _gauge("molink_stage_step_seconds", "Mean engine step time of each stage of the route",
                      labels=["stage", "peer", "layers"])
        for i, s in enumerate(stages):
            if isinstance(s.get("step_ms"), (int, float)):
                step.add_metric([str(i), s["peer"], f"{s['start']}:{s['end']}"], s["step_ms"] / 1000)
        yield step
        rt = pipeline.get("round_trip_ms")
        if isinstance(rt, (int, float)):
            yield _gauge("molink_pipeline_round_trip_seconds", "Mean time of one step through the whole route",
                         rt / 1000)
        if isinstance(pipeline.get("steps"), int):
            yield CounterMetricFamily("molink_pipeline_steps", "Engine steps run through the route",
                                      value=pipeline["steps"])

    def _engine(self, d: Any) -> Iterable[Metric]:
        e = d.engine
        if e is None:
            return
        if e.num_kv_blocks:
            yield _gauge("molink_kv_cache_blocks", "KV cache blocks of this peer's engine", e.num_kv_blocks)
        usage = _vllm_gauge("vllm:kv_cache_usage_perc")
        if usage is not None:
            yield _gauge("molink_kv_cache_usage_ratio", "Fraction of the KV cache in use (from vLLM)", usage)
        yield _gauge("molink_engine_unfinished_requests", "Requests the engine holds (waiting or running)",
                     e.unfinished())

    def _nat(self, d: Any) -> Iterable[Metric]:
        st = d.nat.status() if d.nat is not None else None
        if not st:
            return
        yield _gauge("molink_relay_reservations", "Relay slots this peer holds (it is behind NAT)",
                     len(st.get("reservations") or {}))
        yield _gauge("molink_relay_serving", "1 when this peer serves as a circuit relay",
                     float(bool(st.get("serving_relay"))))
        hp = st.get("hole_punch") or {}
        yield CounterMetricFamily("molink_hole_punch_attempts", "Hole punches tried", value=hp.get("attempts", 0))
        yield CounterMetricFamily("molink_hole_punch_upgrades", "Relayed connections upgraded to direct ones",
                                  value=hp.get("upgrades", 0))


def _vllm_metrics() -> Iterable[Metric]:
    """vLLM's own engine metrics (``vllm:*``), which vLLM keeps in prometheus-client's global
    registry when its engine records stats (on unless ``--no-engine-metrics``); nothing otherwise.
    One engine per daemon process, so the global registry holds only ours."""
    from prometheus_client import REGISTRY

    for m in REGISTRY.collect():
        if m.name.startswith("vllm:"):
            yield m


def _vllm_gauge(name: str) -> float | None:
    from prometheus_client import REGISTRY

    for m in REGISTRY.collect():
        if m.name == name and m.samples:
            return float(sum(s.value for s in m.samples) / len(m.samples))
    return None


async def watch_peers(d: Any, metrics: Metrics, period: float = 1.0) -> None:
    """Log (once) each peer joining or leaving the table; run as a daemon task."""
    import trio

    known: dict[str, Any] = {}
    offline_seen = 0
    while True:
        await trio.sleep(period)
        if d.disc is None or d.node is None:
            continue
        now = {r.peer_id: r for r in d.disc.snapshot() if r.online and r.peer_id != d.node.peer_id}
        goodbyes = d.disc.stats.get("removed_offline", 0)
        for p, r in now.items():
            if p not in known:
                metrics.peer_joined(p, (r.span_start, r.span_end), (r.extras or {}).get("role"))
        gone = [p for p in known if p not in now]
        said_goodbye = goodbyes - offline_seen
        for p in gone:
            reason = "goodbye" if said_goodbye > 0 else "expired"
            said_goodbye -= 1
            metrics.peer_left(p, reason)
        offline_seen = goodbyes
        known = now


def attach(d: Any) -> Metrics:
    """Register the state collector of daemon ``d`` (which owns ``d.metrics``) and return it."""
    d.metrics.registry.register(DaemonCollector(d))
    return d.metrics
