"""The daemon: one trio loop owning the libp2p node, announcements, the HTTP API and the engine bridge.

Roles, decided by the span this peer serves:

- **full** (all layers): plain single-node vLLM; a head with no remote stages.
- **head** (a span starting at layer 0): runs vLLM's scheduler; waits for a route covering the
  rest of the model, then starts its engine with the pipeline executor.
- **stage** (a span not starting at 0): runs a stage process for its layers; heads reach it over
  ``/molink/stage/1``.
- **gateway** (``--layers none``): serves HTTP only, forwarding to heads.

Every role answers HTTP; a peer whose engine cannot answer forwards to a head over libp2p.
``serve(config, task_status)`` runs until cancelled; ``run(config)`` is the process entry point.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from molinkd import __version__, logs, metrics, runtime
from molinkd.api import create_app, serve_http
from molinkd.config import DaemonConfig
from molinkd.engine.driver import EngineOptions, LocalBackend, LocalEngine
from molinkd.forward import PROTOCOL as GENERATE_PROTOCOL
from molinkd.forward import MAX_GENERATE_FRAME, GenerateGuard, RemoteBackend, serve_generate
from molinkd.model import ModelError, ModelInfo, load_model_info

log = logging.getLogger("molinkd")

DEFAULT_THROUGHPUT = 50.0  # tokens/s announced before anything was measured
ROUTE_RETRY = 1.0
HEAD_ROUTE_WAIT = 300.0  # a head loaded while its stages load waits this long for them (< vLLM's 600 s)
# a route peer missing from the peer table this long (after its record expired) is taken as
# hung or gone: the head stops its engine and re-plans (requests in flight are resumed)
ROUTE_PEER_GRACE = 4.0
# the head's engine asks for a new route about every second while it fails over; meanwhile the
# daemon leaves the engine alone (the engine gives up by itself after its failover_wait)
ENGINE_REPLAN_QUIET = 5.0
# a route peer missing from the table: its streams are cut so the engine fails over by itself; if
# the engine has not asked for a route this long after, it is restarted instead
ENGINE_CUT_GRACE = 5.0
ENGINE_RESTART_BACKOFF = (2.0, 30.0)
# the module a stage peer runs its layers in (``python -m STAGE_MODULE``); a hook for instrumented
# stages in tests (tests/integration/lying_daemon.py sets it in its own process), nothing else
STAGE_MODULE = "molinkd.engine.stage"


class _Backoff:
    """Restart delays for engines: doubling from 2 s up to 30 s; an engine that ran for ten minutes
    was healthy, so its next failure may start over (``reset_if_healthy``)."""

    def __init__(self) -> None:
        self.delay = ENGINE_RESTART_BACKOFF[0]

    def reset_if_healthy(self, ran_for: float) -> None:
        if ran_for > 600:
            self.delay = ENGINE_RESTART_BACKOFF[0]

    async def sleep(self) -> None:
        await trio.sleep(self.delay)
        self.delay = min(self.delay * 2, ENGINE_RESTART_BACKOFF[1])


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to change."""


def _say(msg: str) -> None:
    """Operator-facing progress lines (always shown, independent of the log level)."""
    logs.say(msg)


def resolve_layers(layers: str, num_layers: int) -> tuple[int, int] | str:
    """``all`` / ``none`` / ``S:E`` -> (start, end); ``auto`` stays "auto". Raises StartupError."""
    from molinkd.spans import Span, SpanError, parse_span

    try:
        span = parse_span(layers, num_layers)
    except SpanError as e:
        raise StartupError(f"--layers {layers}: {e}") from None
    if span == "auto":
        return "auto"
    if span is None:
        return (0, 0)
    assert isinstance(span, Span)
    return (span.start, span.end)


def engine_options(cfg: DaemonConfig, model: ModelInfo, **extra: Any) -> EngineOptions:
    if cfg.engine_metrics:  # vLLM records its stats (vllm:* in /metrics); costs some CPU per step
        extra["extra_kwargs"] = (*extra.get("extra_kwargs", ()), ("disable_log_stats", False))
    return EngineOptions(
        model=model.path,
        served_name=model.name,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_cache_gib=cfg.kv_cache_gib,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        seed=cfg.seed,
        **extra,
    )


class Daemon:
    """State shared by the daemon's tasks. Owners: engine/backend -> _run_engine or _run_head;
    stage_* -> _run_stage; route -> _run_head; rtts -> _rtt_loop; node/disc -> serve()."""

    def __init__(self, cfg: DaemonConfig, model: ModelInfo, runtime_dir: Path) -> None:
        self.cfg = cfg
        self.model = model
        self.runtime_dir = runtime_dir
        self.metrics = metrics.Metrics()  # event counters; the state is read from here at scrape time
        layers = resolve_layers(cfg.layers, model.num_layers)
        self.span: tuple[int, int] = (0, 0) if layers == "auto" else layers  # type: ignore[assignment]
        self.auto = layers == "auto"
        self.node: Any = None
        self.nat: Any = None
        self.disc: Any = None
        self.engine: LocalEngine | None = None
        self.backend: LocalBackend | None = None
        self.remote: RemoteBackend | None = None
        self.engine_state = "starting"
        self.engine_error: str | None = None
        self.route: list[dict] | None = None
        self.last_route: list[dict] | None = None  # the previous route, to log changes once
        self.route_error: str | None = None
        self.engine_replanning_at = -math.inf  # last time the head's engine asked for a new route
        self.engine_pipes: set[trio.CancelScope] = set()  # the engine processes' libp2p streams
        self.stage_addr: str | None = None
        self.serving_head: str | None = None
        self.stage_sessions: collections.Counter[str] = collections.Counter()  # upstream -> open streams
        self.rtts: dict[str, float] = {}
        self.banned: dict[str, tuple[float, str, float]] = {}  # peer -> (until, reason, ban length)
        self._measured: dict[str, Any] = {}  # peer -> trust.Measured, kept across routes
        from molinkd.audit import AuditLedger

        self.audits = AuditLedger(quorum=cfg.audit_quorum)  # disagreements of this head's audits
        self.last_audit: dict | None = None  # the engine's last audit report (for /status)
        self._stats_read = 0.0
        self.started = time.time()
        self.draining = False
        self.http_url = ""
        self.dial_path = str(runtime_dir / "dial.sock")
        self.stats_path = str(runtime_dir / "pipeline-stats.json")
        self.info_path = str(runtime_dir / "engine-info.json")
        os.environ["MOLINK_ENGINE_INFO"] = self.info_path  # inherited by engine processes

    def loaded_rss_mb(self) -> float | None:
        """Memory of this peer's engine process right after loading its layers (before KV cache)."""
        try:
            return round(json.loads(Path(self.info_path).read_text())["loaded_rss_bytes"] / 2**20, 1)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def measured(self, peer: str) -> Any:
        """This head's measurement of ``peer``'s step time (:class:`molinkd.trust.Measured`), from the
        pipeline stats of the current route or the last one it was measured on."""
        from molinkd.trust import measured_from_stats

        now = time.monotonic()
        if now - self._stats_read > 1.0:
            self._stats_read = now
            try:
                stats = json.loads(Path(self.stats_path).read_text())
            except (OSError, ValueError):
                stats = {}
            for p in (stats.get("stage_ms") or {}) if isinstance(stats, dict) else ():
                if (m := measured_from_stats(stats, p)) is not None:
                    self._measured[p] = m
        return self._measured.get(peer)

    def route_stats(self) -> tuple[list[dict], dict]:
        """The route's stages with their measured step times (from the head executor's stats)."""
        if not self.route:
            return [], {}
        try:
            stats = json.loads(Path(self.stats_path).read_text())
        except (OSError, ValueError):
            stats = {}
        stage_ms = stats.get("stage_ms") or {}
        stages = [dict(h, step_ms=stage_ms.get(h["peer"])) for h in self.route]
        return stages, {"round_trip_ms": stats.get("round_trip_ms"), "steps": stats.get("steps", 0),
                        "depth": stats.get("depth"), "inflight_max": stats.get("inflight_max"),
                        "failovers": stats.get("failovers") or []}

    # -- role ---------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        s, e = self.span
        if self.auto and e == 0:
            return "choosing"
        if e == 0:
            return "gateway"
        if s == 0 and e == self.model.num_layers:
            return "full"
        return "head" if s == 0 else "stage"

    # -- backends -----------------------------------------------------------------------------

    def current_backend(self) -> Any:
        if self.draining:
            return None  # new requests go elsewhere (503 here; a gateway resumes them on another head)
        if self.backend is not None:
            return self.backend
        if self.remote is not None and self.head_candidates():
            return self.remote
        return None

    def head_candidates(self) -> list[str]:
        """Peers whose engine answers generate requests, best first (least loaded, then nearest)."""
        if self.disc is None:
            return []
        heads = [r for r in self.disc.snapshot() if r.online and r.span_start == 0 and r.span_end > 0
                 and (r.extras or {}).get("engine") == "ready" and r.peer_id != self.node.peer_id]
        heads.sort(key=lambda r: (r.active_requests, self.rtts.get(r.peer_id, 1.0), r.peer_id))
        return [r.peer_id for r in heads]

    def busy(self) -> str:
        """What a graceful stop still waits for ("" when nothing)."""
        active = (self.backend.active if self.backend else 0) + (self.remote.active if self.remote else 0)
        parts = [f"{active} in-flight request(s)"] if active else []
        if self.stage_sessions:
            parts.append(f"the session of head {str(self.serving_head)[:16]}")
        return " and ".join(parts)

    def may_dial(self, peer: str, start: int, end: int) -> str | None:
        """Whether an engine process of ours may reach ``peer`` as the stage for ``start:end``:
        None if the swarm shows that peer online, serving exactly that span of our model as a
        stage; otherwise the reason. Routes relayed by engine processes come off the network."""
        rec = self.disc.table.get(peer) if self.disc is not None else None
        if rec is None or not rec.online:
            return "it is not announcing itself in this swarm"
        if rec.model_hash != self.model.model_hash:
            return "it serves another model"
        if (rec.span_start, rec.span_end) != (start, end) or start <= 0:
            return f"it serves layers {rec.span_start}:{rec.span_end}, not {start}:{end}"
        return None

    # -- announcements --------------------------------------------------------------------------

    def record_fields(self) -> dict:
        b = self.backend
        thr = b.throughput.rate() if b else 0.0
        extras: dict[str, Any] = {
            "engine": self.engine_state,
            "role": self.role,
            "http": self.http_url,
            "rtt": {p[:16]: round(v * 1000, 2) for p, v in list(self.rtts.items())[:16]},
        }
        if self.serving_head:
            extras["serving_head"] = self.serving_head
        if self.route:
            extras["route"] = [h["peer"] for h in self.route]
        return {
            "model_name": self.model.name,
            "span_start": self.span[0],
            "span_end": self.span[1],
            "total_layers": self.model.num_layers,
            "free_kv_blocks": int(self.engine.num_kv_blocks or 0) if self.engine else 0,
            "throughput": round(thr if thr > 0 else DEFAULT_THROUGHPUT, 2),
            "active_requests": (b.active if b else 0) + (self.remote.active if self.remote else 0),
            "version": __version__,
            "extras": extras,
        }

    # -- status -----------------------------------------------------------------------------

    @property
    def resumed_requests(self) -> int:
        """Requests that lost their engine or head and continued elsewhere."""
        return int(self.metrics.counter_value(self.metrics.resumed))

    def self_record(self) -> Any:
        return _self_record(self)

    def coverage(self) -> Any:
        """Coverage of the model's layers by the online peers we know, ourselves included."""
        from p2p.records import coverage

        me = self.node.peer_id if self.node else None
        recs = [r for r in (self.disc.snapshot() if self.disc else []) if r.peer_id != me]
        return coverage(recs + ([] if self.span[1] == 0 or self.node is None else [_self_record(self)]),
                        self.model.num_layers, self.model.model_hash)

    def readiness(self) -> tuple[bool, str]:
        """Whether a generate request sent now would be served, and if not why (``GET /ready``)."""
        b = self.current_backend()
        me = self.node.peer_id if self.node else None
        peers = [r for r in (self.disc.snapshot() if self.disc else []) if r.online and r.peer_id != me]
        return metrics.readiness(role=self.role, engine_state=self.engine_state, engine_error=self.engine_error,
                                 serving=b is not None and getattr(b, "ready", True), route_error=self.route_error,
                                 gaps=self.coverage().gaps if self.disc else None, peers_known=len(peers))

    async def status(self) -> dict:
        b = self.backend
        peers = []
        me_id = self.node.peer_id if self.node else None
        snapshot = [r for r in (self.disc.snapshot() if self.disc else []) if r.peer_id != me_id]
        now = time.time()
        for r in snapshot:
            d = r.to_dict()
            d["layers"] = [r.span_start, r.span_end]
            d["rtt_ms"] = round(self.rtts[r.peer_id] * 1000, 2) if r.peer_id in self.rtts else None
            d["last_seen"] = r.time
            d["age_s"] = round(max(0.0, now - r.time), 1)
            peers.append(d)
        stages, pipeline = self.route_stats()
        mine = self.record_fields()
        if self.node is not None:
            me = dict(mine, peer_id=self.node.peer_id, addrs=self.node.addrs(), layers=list(self.span),
                      rtt_ms=None, last_seen=now, state="online")
            peers.insert(0, me)
        cov = self.coverage() if self.disc else None
        ready, reason = self.readiness()
        return {
            "peer_id": self.node.peer_id if self.node else None,
            "addrs": self.node.addrs() if self.node else [],
            "version": __version__,
            "role": self.role,
            "model": {"name": self.model.name, "hash": self.model.model_hash, "num_layers": self.model.num_layers,
                      "path": self.model.path},
            "layers": list(self.span),
            "engine": {"state": self.engine_state, "error": self.engine_error,
                       "kv_blocks": self.engine.num_kv_blocks if self.engine else None,
                       "max_model_len": self.engine.max_model_len if self.engine else None,
                       "unfinished": self.engine.unfinished() if self.engine else 0,
                       "loaded_rss_mb": self.loaded_rss_mb()},
            "ready": self.current_backend() is not None if self.role in ("full", "head", "gateway") else (
                self.stage_addr is not None),
            "active_requests": (b.active if b else 0) + (self.remote.active if self.remote else 0),
            "total_requests": (b.total_requests if b else 0) + (self.remote.total_requests if self.remote else 0),
            "resumed_requests": self.resumed_requests,
            "readiness": {"ready": ready, "reason": reason},
            "counters": self.metrics.summary(),
            "throughput": round(b.throughput.rate(), 2) if b else 0.0,
            "http": self.http_url,
            "route": [h["peer"] for h in self.route] if self.route else None,
            "route_error": self.route_error,
            "stages": stages,
            "pipeline": pipeline,
            "serving_head": self.serving_head,
            "audits": dict(self.metrics.audit_counts(), pending=self.audits.pending(), last=self.last_audit),
            "banned": {p: {"reason": why, "active": until > time.monotonic(),
                           "remaining_s": max(0.0, round(until - time.monotonic(), 1))}
                       for p, (until, why, _) in self.banned.items()},
            "coverage": cov.to_dict() if cov else None,
            "engine_rss_mb": _children_rss_mb(),
            "bootstrap": self.node.bootstrap_status() if self.node else [],
            "perimeter": self.node.limits_status() if self.node else None,
            "nat": self.nat.status() if self.nat else None,
            "discovery": self.disc.stats if self.disc else {},
            "peers": peers,
            "uptime": round(time.time() - self.started, 1),
        }


def _children_rss_mb() -> float | None:
    """Resident memory of this daemon's engine processes (vLLM EngineCore or the stage process)."""
    try:
        import psutil

        kids = psutil.Process().children(recursive=True)
        return round(sum(k.memory_info().rss for k in kids if k.is_running()) / 2**20, 1)
    except Exception:
        return None


def _self_record(d: Daemon) -> Any:
    from p2p.records import PeerRecord

    return PeerRecord(peer_id=d.node.peer_id, addrs=tuple(d.node.addrs()), model_name=d.model.name,
                      model_hash=d.model.model_hash, span_start=d.span[0], span_end=d.span[1],
                      total_layers=d.model.num_layers)


# ------------------------------------------------------------------------------ role tasks


class RouteLost(RuntimeError):
    """A peer of the running route stopped announcing itself (hung, or gone without a word)."""

    def __init__(self, peer: str) -> None:
        super().__init__(f"stage {peer[:16]} stopped announcing itself (hung, or gone without a goodbye)")
        self.peer = peer


def route_watch(d: Daemon, hops: list[dict], grace: float = ROUTE_PEER_GRACE) -> Callable[[], None]:
    """A check to call every second while a pipeline runs: raises :class:`RouteLost` once a remote
    stage of ``hops`` has been missing from the peer table for ``grace`` seconds; bans (without
    stopping the pipeline) a stage whose announced speed its measured one belies. A hung stage
    never closes its stream, and its step may take a while; its silence on the swarm is quicker
    to see than any step deadline that must allow for big prefills on slow machines."""
    missing_since: dict[str, float] = {}
    cut_at: dict[str, float] = {}

    def check() -> None:
        from molinkd.trust import lie

        records = {r.peer_id: r for r in d.disc.snapshot() if r.online} if d.disc else {}
        now = time.monotonic()
        if now - getattr(d, "engine_replanning_at", -math.inf) < ENGINE_REPLAN_QUIET:
            missing_since.clear()  # the engine is replacing its route itself (bounded by its failover_wait)
            return
        for h in (d.route or hops)[1:]:  # the route in use: the engine may have failed over
            peer = h["peer"]
            ban = d.banned.get(peer)
            if (peer in records and (ban is None or ban[0] <= now)
                    and (why := lie(records[peer].throughput, d.measured(peer)))):
                # it computes, so the running pipeline may keep it; no route will choose it again
                _ban(d, peer, f"lied about its speed: {why}")
            if peer in records:
                missing_since.pop(peer, None)
                continue
            since = missing_since.setdefault(peer, now)
            # a stage that said goodbye is draining: route around it now (it finishes what it
            # holds meanwhile); a silent one may be a slow announcement: wait ``grace``
            said_goodbye = peer in (getattr(d.disc, "departed", None) or {})
            if now - since < grace and not said_goodbye:
                continue
            if peer not in cut_at:
                # the engine fails over by itself once its pipeline breaks: break it
                cut_at[peer] = now
                log.warning("route peer stopped announcing; cutting the engine's streams",
                            extra=logs.kv(peer=peer))
                for scope in list(getattr(d, "engine_pipes", ())):
                    scope.cancel()
            elif now - cut_at[peer] >= ENGINE_CUT_GRACE:
                raise RouteLost(peer)

    return check


async def _run_engine(d: Daemon, *, task_status=trio.TASK_STATUS_IGNORED, extra: dict | None = None,
                      watch: Callable[[], None] | None = None) -> None:
    """Run a local engine (full model, or a pipeline head when ``extra`` holds its kwargs/env).
    ``watch()`` is called every second while it runs; whatever it raises stops the engine."""
    engine = LocalEngine(engine_options(d.cfg, d.model, **(extra or {})))
    d.engine = engine
    d.engine_state = "loading"
    task_status.started()
    t0 = time.monotonic()
    _say(f"loading {d.model.name} layers {d.span[0]}:{d.span[1]} with vLLM (about 30 s on CPU)...")
    try:
        await trio.to_thread.run_sync(engine.start, abandon_on_cancel=True)
    except Exception as e:
        d.engine_state = "failed"
        d.engine_error = f"{type(e).__name__}: {e}"
        log.error("engine failed to start", extra=logs.kv(error=d.engine_error))
        raise
    d.backend = LocalBackend(engine)
    d.engine_state = "ready"
    d.engine_error = None
    if d.disc is not None:
        d.disc.announce_now()
    _say(f"engine ready in {time.monotonic() - t0:.1f}s; serving on {d.http_url}")
    try:
        while engine.alive:
            await trio.sleep(1.0)
            if watch is not None:
                watch()
        raise RuntimeError("the engine stopped (a stage failed or the engine process died)")
    finally:
        d.backend = None
        d.engine_state = "stopped"
        # bounded: an EngineCore stuck on a dead pipeline must not keep the daemon from exiting
        with trio.CancelScope(shield=True), trio.move_on_after(20):
            await trio.to_thread.run_sync(engine.shutdown, abandon_on_cancel=True)


AVOIDED_LOAD = 1e6  # a peer the engine suspects: routed through only if nothing else serves its span


def _stage_records(d: Daemon, avoid: set[str] | frozenset[str] = frozenset(), *, loading: bool = False) -> list:
    """Route candidates, planned with the speed this head measured (announcements are capped);
    ``avoid``: peers the head's engine suspects, used only where nothing else serves their span;
    ``loading``: stages still loading their layers count too (for a route to expect, not to use)."""
    from molinkd.routing import PeerRecord as RoutePeer
    from molinkd.trust import planning_throughput

    states = ("ready", "loading") if loading else ("ready",)
    out = []
    for r in d.disc.snapshot():
        ex = r.extras or {}
        if not r.online or r.span_end == 0 or ex.get("role") not in ("stage",) or ex.get("engine") not in states:
            continue
        holder = ex.get("serving_head")
        if holder and holder != d.node.peer_id:
            continue  # serves another head: one head per stage at a time
        load = min(1.0, r.active_requests / max(1, d.cfg.max_num_seqs))
        if r.peer_id in avoid:
            load = AVOIDED_LOAD
        out.append(RoutePeer(peer_id=r.peer_id, span_start=r.span_start, span_end=r.span_end,
                             throughput=planning_throughput(r.throughput, d.measured(r.peer_id)), load=load,
                             rtt=d.rtts.get(r.peer_id), model_hash=r.model_hash))
    return out


class _Replan(Exception):
    """Probing found stages that are busy or misbehaving (now skipped or banned): plan again."""


def _uncovered(d: Daemon, banned: set[str]) -> str:
    """The layers after the head's span no usable stage serves, e.g. ``10:20`` (for messages)."""
    from p2p.records import runs

    served = [False] * d.model.num_layers
    for r in _stage_records(d):
        if r.peer_id not in banned:
            for i in range(r.span_start, min(r.span_end, d.model.num_layers)):
                served[i] = True
    holes = [(a, b) for a, b in runs(served, lambda v: not v) if b > d.span[1]]
    return ", ".join(f"{max(a, d.span[1])}:{b}" for a, b in holes) or "none (spans do not chain)"


def _head_hop(d: Daemon) -> Any:
    """This head as the first hop of a route to plan."""
    from molinkd.routing import PeerRecord as RoutePeer

    return RoutePeer(peer_id=d.node.peer_id, span_start=0, span_end=d.span[1], throughput=DEFAULT_THROUGHPUT,
                     model_hash=d.model.model_hash)


def _banned_now(d: Daemon) -> set[str]:
    now = time.monotonic()
    return {p for p, (until, _, _) in d.banned.items() if until > now}


async def _plan_probed_route(d: Daemon, skipped: dict[str, float], avoid: set[str] = frozenset(),
                             exclude: set[str] = frozenset()) -> list[dict]:
    """A route for this head through stages that answer a probe (head first, ``p2p:`` addresses),
    never through ``exclude``. Raises NoRouteError naming the layers nobody serves, or _Replan after
    probing."""
    from molinkd.routing import NoRouteError, plan_route, route_to_dicts

    now = time.monotonic()
    banned = _banned_now(d) | {p for p, until in skipped.items() if until > now} | set(exclude)
    try:
        route = plan_route(_head_hop(d), _stage_records(d, avoid), d.model.num_layers, rtts=d.rtts, banned=banned)
    except NoRouteError as e:
        raise NoRouteError(f"layers {_uncovered(d, banned)} are served by no usable peer ({e})") from None
    bad, busy = await _probe_route(d, route)
    for peer in busy:
        skipped[peer] = time.monotonic() + 5.0  # busy is not a fault: look again soon
    for peer, why in bad.items():
        _ban(d, peer, why)
    if bad or busy:
        raise _Replan()
    return route_to_dicts(route, {h.peer_id: f"p2p:{h.peer_id}" for h in route.hops})


def _use_route(d: Daemon, hops: list[dict]) -> None:
    """Take ``hops`` as the route in use (a fresh engine's, or a failed-over engine's new tail)."""
    if hops != d.last_route:
        d.metrics.route_chosen(hops, d.last_route)
    d.route = d.last_route = hops
    d.route_error = None
    if d.disc is not None:
        d.disc.announce_now()


async def _replan_for_engine(d: Daemon, exclude: list[str], avoid: list[str]) -> list[dict]:
    """Answer the head engine's ``p2p.route`` (in-engine failover): ban what it excludes, plan
    around what it avoids, and take the new route as the one in use. The engine keeps running."""
    from molinkd.routing import NoRouteError

    if d.role != "head":
        raise RuntimeError(f"this peer is a {d.role}, not a head: it plans no routes")
    d.engine_replanning_at = time.monotonic()
    now = time.monotonic()
    for peer in exclude:
        # a peer already banned (an audit caught it, say) keeps its ban and the reason for it
        if peer != d.node.peer_id and not (peer in d.banned and d.banned[peer][0] > now):
            _ban(d, peer, "failed in the pipeline (reported by the head's engine)")
    skipped: dict[str, float] = {}
    for _ in range(5):
        try:
            hops = await _plan_probed_route(d, skipped, set(avoid))
        except NoRouteError as e:
            d.route_error = str(e)
            raise
        except _Replan:
            continue
        _use_route(d, hops)
        return hops
    raise NoRouteError("the stages of every route found were busy or failed their probe")


def _expected_stages(d: Daemon) -> int | None:
    """How many hops a route would have once the stages announced so far (loading ones too) are
    ready, or None if even they do not cover the model."""
    from molinkd.routing import NoRouteError, plan_route

    try:
        return len(plan_route(_head_hop(d), _stage_records(d, loading=True), d.model.num_layers, rtts=d.rtts,
                              banned=_banned_now(d)).hops)
    except NoRouteError:
        return None


async def _run_head(d: Daemon) -> None:
    """Wait for a route covering the model, start the engine on it; re-plan when it fails (the
    engine fails over to a new tail by itself while it can: :mod:`molinkd.engine.failover`).

    When the stages that would cover the model are announced but still loading, the engine
    starts at once with this head's hop alone: it loads its layers meanwhile and asks for the
    rest of the route when done (up to ``HEAD_ROUTE_WAIT``; after such a start failed, it waits
    for a ready route first, as it always does when nobody covers the model)."""
    from molinkd.engine.head import pipeline_engine_kwargs
    from molinkd.routing import NoRouteError

    backoff = _Backoff()
    announced_wait = False
    early_failed = False  # an early start found no route in time: wait for one before loading again
    skipped: dict[str, float] = {}
    while True:
        expected = None
        try:
            hops = await _plan_probed_route(d, skipped)
        except NoRouteError as e:
            d.route_error = str(e)
            expected = None if early_failed else _expected_stages(d)
            if expected is None:
                d.engine_state = "waiting for route"
                if not announced_wait:
                    _say(f"waiting for peers to cover the rest of the model: {e}")
                    announced_wait = True
                await trio.sleep(ROUTE_RETRY)
                continue
            me = d.node.peer_id
            hops = [{"peer": me, "addr": f"p2p:{me}", "start": 0, "end": d.span[1]}]
            _say(f"the stages covering layers {d.span[1]}:{d.model.num_layers} are loading: "
                 "loading this head's layers meanwhile")
        except _Replan:
            continue
        pps = d.cfg.pipeline_parallel_size
        if pps is not None and expected is None and pps != len(hops):
            log.warning("--pipeline-parallel-size %d differs from the route found (%d stages); using the route",
                        pps, len(hops))
            _say(f"warning: --pipeline-parallel-size {pps} but the route has {len(hops)} stages; using the route")
        if expected is None:
            _use_route(d, hops)
        kwargs = pipeline_engine_kwargs(hops, model_hash=d.model.model_hash, stats_path=d.stats_path,
                                        failover_wait=d.cfg.failover_wait, audit_rate=d.cfg.audit_rate,
                                        audit_tolerance=d.cfg.audit_tolerance,
                                        route_wait=HEAD_ROUTE_WAIT if expected else 0.0, expected_stages=expected)
        extra_env = (("MOLINK_P2P_DIAL", d.dial_path),)
        started = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d.stats_path)
        try:
            await _run_engine(d, extra={"extra_kwargs": tuple(kwargs.items()), "extra_env": extra_env},
                              watch=route_watch(d, hops))
        except Exception as e:  # the engine died or could not open the session: re-plan
            early_failed = expected is not None and d.route is None
            failure = {"message": str(e), "peer": e.peer} if isinstance(e, RouteLost) else _read_failure(d)
            d.engine_error = failure.get("message") or f"{type(e).__name__}: {e}"
            d.engine_state = "restarting"
            culprit = failure.get("peer")
            if culprit and culprit != d.node.peer_id:
                _ban(d, culprit, d.engine_error)
            _say(f"pipeline engine stopped ({d.engine_error}); re-planning in {backoff.delay:.0f}s")
        d.route = None
        backoff.reset_if_healthy(time.monotonic() - started)
        await backoff.sleep()
        announced_wait = False


async def _plan_verifier_route(d: Daemon, exclude: list[str]) -> list[dict]:
    """Answer the head engine's ``p2p.verifiers`` (an audit): a probed route through none of
    ``exclude`` (the route's remote stages) and no stage serving another head, preferably through
    none of the verifiers that already disagreed about those stages (a quorum needs distinct
    witnesses). Not the route in use: nothing else changes."""
    from molinkd.routing import NoRouteError

    if d.role != "head":
        raise RuntimeError(f"this peer is a {d.role}, not a head: it plans no routes")
    witnesses = d.audits.witnesses(exclude)
    skipped: dict[str, float] = {}
    for _ in range(3):
        try:
            return await _plan_probed_route(d, skipped, exclude=set(exclude) | witnesses)
        except _Replan:
            continue
        except NoRouteError:
            if not witnesses:
                raise
            witnesses = set()  # nobody else: the same witness again (it counts once)
    raise NoRouteError("the verifier stages found were busy or failed their probe")


def _on_audit(d: Daemon, report: dict) -> dict:
    """An audit's outcome from the head's engine (checked by ``bridge.check_audit_report``): count
    it; a disagreement goes to the ledger, which says when the quorum bans an exactly blamed stage
    (the answer's ``ban``) or sends the engine away from a set of suspects (``avoid``)."""
    outcome, blamed, verifiers = report["outcome"], report["blamed"], report["verifiers"]
    d.metrics.audited(outcome, blamed=blamed, verifiers=verifiers, detail=report["detail"])
    d.last_audit = dict(report, time=round(time.time(), 3))
    if outcome != "disagree":
        return {"ban": [], "avoid": []}
    me = d.node.peer_id if d.node else None
    if me in blamed or me in verifiers:
        return {"ban": [], "avoid": [], "error": "an audit cannot blame or use this head"}
    try:
        decision = d.audits.record_disagreement(blamed, verifiers)
    except ValueError as e:
        return {"ban": [], "avoid": [], "error": str(e)}
    if decision is None:
        return {"ban": [], "avoid": []}
    what, peers = decision
    if what == "ban":
        _ban(d, peers[0], f"returned wrong values (audit by {', '.join(p[:12] for p in verifiers)}: "
                          f"{report['detail'][:300]})")
        return {"ban": list(peers), "avoid": []}
    return {"ban": [], "avoid": list(peers)}


def _read_failure(d: Daemon) -> dict:
    """What the head executor wrote about why the pipeline failed (and whose fault it was)."""
    try:
        failure = json.loads(Path(d.stats_path).read_text()).get("failure") or {}
    except (OSError, ValueError):
        return {}
    return failure if isinstance(failure, dict) else {}


def _ban(d: Daemon, peer: str, why: str) -> None:
    """Route around ``peer`` for a while (``--ban-seconds``, default 30 s, doubling on repeat
    offences, at most 10 min)."""
    prev = d.banned.get(peer)
    now = time.monotonic()
    # repeat offences double the ban; a peer that behaved for 10 minutes starts over
    length = min(prev[2] * 2, 600.0) if prev and now - prev[0] < 600 else d.cfg.ban_seconds
    d.banned[peer] = (time.monotonic() + length, why, length)
    d.metrics.banned(peer, length, why)


class _Busy(Exception):
    """The stage is fine but cannot take us now (loading, or serving another head)."""


async def _probe_route(d: Daemon, route: Any) -> tuple[dict[str, str], set[str]]:
    """Probe every remote stage of ``route``: ({peer: reason} of misbehaving ones, busy peers)."""
    from molinkd.bridge import probe_stage

    bad: dict[str, str] = {}
    busy: set[str] = set()
    for hop in route.hops[1:]:
        try:
            info = await probe_stage(d.node, hop.peer_id)
            if info.get("model_hash") != d.model.model_hash:
                raise ValueError(f"serves model {str(info.get('model_hash'))[:12]}, not {d.model.short_hash}")
            if info.get("span") != [hop.span_start, hop.span_end]:
                raise ValueError(f"serves {info.get('span')}, announced {hop.span_start}:{hop.span_end}")
            if not info.get("ready"):
                raise _Busy("its engine is not ready")
            holder = info.get("serving_head")
            if holder and holder != d.node.peer_id:
                raise _Busy(f"it serves another head ({str(holder)[:12]})")
        except _Busy:
            busy.add(hop.peer_id)
        except Exception as e:
            bad[hop.peer_id] = f"{type(e).__name__}: {e}"
    return bad, busy


async def _run_stage(d: Daemon) -> None:
    """Run the stage process for this peer's span and keep it running."""
    from molinkd.bridge import STAGE_PROTOCOL, stage_stream_handler

    def admit(body: Any, remote: str) -> Any:
        from molinkd.engine.admission import admit as admit_session

        return admit_session(body, me=d.node.peer_id, span=d.span, num_layers=d.model.num_layers,
                             model_hash=d.model.model_hash, opener=remote)

    def on_session(admitted: Any, upstream: str) -> bool:
        head = admitted.head
        if d.serving_head is not None and d.stage_sessions and head != d.serving_head:
            return False  # one head per stage: its KV cache belongs to one scheduler
        d.stage_sessions[upstream] += 1
        if head != d.serving_head:
            d.serving_head = head
            d.disc.announce_now()
        return True

    def on_end(upstream: str) -> None:
        d.stage_sessions[upstream] -= 1
        if d.stage_sessions[upstream] <= 0:
            del d.stage_sessions[upstream]
        if not d.stage_sessions:
            d.serving_head = None
            d.disc.announce_now()

    def info() -> dict:
        return {"peer": d.node.peer_id, "model_hash": d.model.model_hash, "span": list(d.span),
                "ready": d.stage_addr is not None, "serving_head": d.serving_head, "version": __version__}

    d.node.set_stream_handler(STAGE_PROTOCOL, stage_stream_handler(lambda: d.stage_addr, admit, on_session, on_end, info))
    backoff = _Backoff()
    while True:
        sock = d.runtime_dir / "stage.sock"
        ready = d.runtime_dir / "stage.ready"
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        cmd = [sys.executable, "-m", STAGE_MODULE, "--model", d.model.path,
               "--layers", f"{d.span[0]}:{d.span[1]}", "--listen", f"unix:{sock}", "--ready-file", str(ready),
               "--model-hash", d.model.model_hash, "--peer-id", d.node.peer_id,
               "--dtype", d.cfg.dtype if d.cfg.dtype != "auto" else "bfloat16",
               "--max-model-len", str(d.cfg.max_model_len or 2048), "--max-num-seqs", str(d.cfg.max_num_seqs),
               "--kv-cache-gib", repr(float(d.cfg.kv_cache_gib))]
        if d.cfg.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(d.cfg.max_num_batched_tokens)]
        env = dict(os.environ, MOLINK_P2P_DIAL=d.dial_path)
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        env.setdefault("PYTHONWARNINGS", "ignore")
        log_path = d.runtime_dir / "stage.log"
        d.engine_state = "loading"
        _say(f"loading layers {d.span[0]}:{d.span[1]} of {d.model.name} in a stage process (log: {log_path})")
        t0 = time.monotonic()
        with open(log_path, "ab") as logf:
            proc = await trio.lowlevel.open_process(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None and not ready.exists():
                await trio.sleep(0.2)
            if proc.poll() is None:
                d.stage_addr = ready.read_text().strip()
                d.engine_state = "ready"
                d.engine_error = None
                d.disc.announce_now()
                _say(f"stage ready in {time.monotonic() - t0:.1f}s")
                await proc.wait()
            tail = _tail_lines(log_path, 20)
            last = next((line for line in reversed(tail) if line.strip()), "")
            d.engine_error = f"stage process exited with {proc.returncode}: {last[:300]}"
            # the runtime directory (and this log) goes with the daemon: keep the evidence in ours
            log.error("stage process exited", extra=logs.kv(code=proc.returncode, log_tail=" | ".join(tail)[-3000:]))
        finally:
            d.stage_addr = None
            if proc.poll() is None:
                proc.terminate()
                with trio.move_on_after(10) as scope:
                    scope.shield = True
                    await proc.wait()
                if proc.poll() is None:
                    proc.kill()
        d.engine_state = "failed"
        _say(f"{d.engine_error}; restarting in {backoff.delay:.0f}s")
        await backoff.sleep()


def _tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a (small) log file, [] if unreadable."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return fh.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


async def _choose_auto_span(d: Daemon) -> None:
    from molinkd.spans import ServedSpan, choose_span, span_length_for

    await trio.sleep(2.5 * d.cfg.announce_period)  # hear the swarm first
    table = [ServedSpan(r.peer_id, r.span_start, r.span_end, max(r.throughput, 1e-3))
             for r in d.disc.snapshot() if r.online and r.span_end > 0]
    weights = sum(p.stat().st_size for p in Path(d.model.path).glob("*.safetensors")) or 1
    per_layer = max(1, int(2.5 * weights / max(1, d.model.num_layers)))
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    length = span_length_for(d.model.num_layers, free_memory_bytes=free, bytes_per_layer=per_layer,
                             max_layers=d.cfg.max_layers)
    span = choose_span(table, d.model.num_layers, length, exclude_peer=d.node.peer_id)
    d.span = (span.start, span.end)
    _say(f"--layers auto chose {span.start}:{span.end} (swarm had {len(table)} serving peers)")
    d.disc.announce_now()


async def _supervise_nat(d: Daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """NAT traversal services (relay, reservations, hole punching); restarted if they ever fail,
    never fatal: a peer without NAT traversal still serves whoever can reach it."""
    from p2p import nat

    config = nat.NatConfig(reachability=d.cfg.reachability, announce=tuple(d.cfg.announce))
    started, delay = False, 2.0
    while True:
        try:
            async with trio.open_nursery() as nursery:
                d.nat = await nursery.start(nat.run_nat_services, d.node, config)
                if not started:
                    started = True
                    task_status.started()
        except Exception as e:  # noqa: BLE001
            d.nat = None
            log.warning("NAT services failed; restarting", extra=logs.kv(error=f"{type(e).__name__}: {e}"))
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, 120.0)


async def _rtt_loop(d: Daemon) -> None:
    while True:
        peers = [r.peer_id for r in d.disc.snapshot() if r.online][:16]
        for pid in peers:
            try:
                d.rtts[pid] = await d.node.ping(pid, timeout=3.0)
            except Exception:
                d.rtts.pop(pid, None)
        for pid in list(d.rtts):
            if pid not in peers:
                d.rtts.pop(pid, None)
        await trio.sleep(5.0)


# ----------------------------------------------------------------------------------- serve


async def serve(cfg: DaemonConfig, stop: trio.Event | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until ``stop`` is set (then say goodbye to the swarm) or until cancelled."""
    try:
        model = await trio.to_thread.run_sync(load_model_info, cfg.model, cfg.served_model_name)
    except ModelError as e:
        raise StartupError(str(e)) from e
    with runtime.runtime_dir() as rundir, runtime.scratch_in(rundir):
        await _serve(cfg, model, rundir, stop, task_status)


async def _serve(cfg: DaemonConfig, model: ModelInfo, runtime_dir: Path, stop: trio.Event | None,
                 task_status) -> None:
    from molinkd.bridge import STAGE_PROTOCOL, serve_dial_socket
    from p2p.discovery import Discovery
    from p2p.host import NodeConfig, open_node, read_allow_peers

    d = Daemon(cfg, model, runtime_dir)
    app = create_app(d.current_backend, d.status, api_key=cfg.api_key, metrics=metrics.attach(d),
                     ready_fn=d.readiness, why_unavailable=lambda: d.route_error)
    node_cfg = NodeConfig(listen=tuple(cfg.listen), announce=tuple(cfg.announce), bootstrap=tuple(cfg.bootstrap),
                          identity_path=cfg.identity, swarm_key_path=cfg.swarm_key,
                          allow_peers=read_allow_peers(cfg.allow_peers) if cfg.allow_peers else None)
    async with open_node(node_cfg) as node, trio.open_nursery() as nursery:
        d.node = node
        d.metrics.peer_id = node.peer_id
        _say(f"peer {node.peer_id}; join this swarm with:")
        for a in node.addrs():
            _say(f"    --bootstrap {a}")
        try:
            urls = await nursery.start(serve_http, app, cfg.http)
        except OSError as e:
            raise StartupError(f"cannot listen for HTTP on {cfg.http}: {e.strerror or e}; "
                               "choose another --http") from e
        d.http_url = urls[0] if urls else f"http://{cfg.http}"
        _say(f"HTTP API on {d.http_url} (model {model.name}, hash {model.short_hash})")
        await nursery.start(_supervise_nat, d)
        d.disc = Discovery(node, model.model_hash, d.record_fields, period=cfg.announce_period)
        await nursery.start(d.disc.run)
        d.remote = RemoteBackend(node, model.name, model.model_hash, d.head_candidates, api_key=cfg.api_key)
        guard = GenerateGuard(node.peer_id, api_key=cfg.api_key, peer_allowed=node.peer_allowed)
        node.set_stream_handler(
            GENERATE_PROTOCOL,
            lambda s, remote: serve_generate(s, remote, backend_fn=lambda: None if d.draining else d.backend,
                                             model_hash=model.model_hash, guard=guard),
            max_frame=MAX_GENERATE_FRAME)
        await nursery.start(lambda task_status: serve_dial_socket(
            node, d.dial_path, allowed_protocols={STAGE_PROTOCOL}, may_dial=d.may_dial,
            plan_route=lambda exclude, avoid: _replan_for_engine(d, exclude, avoid), pipes=d.engine_pipes,
            plan_verifiers=lambda exclude: _plan_verifier_route(d, exclude), on_audit=lambda b: _on_audit(d, b),
            task_status=task_status))
        nursery.start_soon(_rtt_loop, d)
        nursery.start_soon(metrics.watch_peers, d, d.metrics)
        if d.auto:
            await _choose_auto_span(d)
        role = d.role
        if role == "full":
            nursery.start_soon(_run_full, d)
        elif role == "head":
            nursery.start_soon(_run_head, d)
        elif role == "stage":
            nursery.start_soon(_run_stage, d)
        else:
            d.engine_state = "none"
            _say("gateway: serving HTTP only, forwarding requests to heads")
        task_status.started(d)
        await (stop if stop is not None else trio.Event()).wait()
        await _drain(d)
        nursery.cancel_scope.cancel()


async def _drain(d: Daemon) -> None:
    """Graceful stop: say goodbye (heads route around us, gateways pick other heads, new requests
    here get a 503), then give in-flight requests, and the head a stage serves, up to
    ``drain_timeout`` seconds to finish. The goodbye goes out while the host's tasks still run."""
    d.draining = True
    with trio.move_on_after(3):
        await d.disc.leave()
        await trio.sleep(0.3)
    busy = d.busy()
    if not busy:
        return
    _say(f"draining: waiting up to {d.cfg.drain_timeout:.0f}s for {busy}")
    t0 = time.monotonic()
    with trio.move_on_after(d.cfg.drain_timeout):
        while d.busy():
            await trio.sleep(0.2)
    left = d.busy()
    if left:
        _say(f"drain timeout: stopping with {left} unfinished")
    else:
        _say(f"drained in {time.monotonic() - t0:.1f}s")


async def _run_full(d: Daemon) -> None:
    """Serve the whole model. A failure at the first start is fatal (bad model, no memory: the
    operator must act); an engine that dies later is restarted with backoff."""
    backoff = _Backoff()
    first = True
    while True:
        started = time.monotonic()
        try:
            await _run_engine(d)
        except Exception as e:
            if first and d.backend is None and d.engine_state == "failed":
                raise StartupError(f"the vLLM engine failed: {type(e).__name__}: {e}") from e
            d.engine_state = "restarting"
            d.engine_error = f"{type(e).__name__}: {e}"
            _say(f"engine stopped ({d.engine_error}); restarting in {backoff.delay:.0f}s")
        first = False
        backoff.reset_if_healthy(time.monotonic() - started)
        await backoff.sleep()


async def _main(cfg: DaemonConfig) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        async def _signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for s in sigs:
                    if not stop.is_set():
                        _say(f"received {signal.Signals(s).name}; leaving the swarm and shutting down")
                        stop.set()
                        nursery.start_soon(_hard_stop_after, cfg.drain_timeout + 15.0, nursery.cancel_scope)
                    else:
                        nursery.cancel_scope.cancel()
                        return

        nursery.start_soon(_signals)
        await serve(cfg, stop)
        nursery.cancel_scope.cancel()


async def _hard_stop_after(seconds: float, scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    scope.cancel()


def _unwrap(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def run(cfg: DaemonConfig) -> int:
    logs.setup(cfg.log_level, cfg.log_json)
    try:
        from p2p.host import configure_libp2p_logging

        configure_libp2p_logging()
    except ImportError:
        pass
    try:
        trio.run(_main, cfg)
    except BaseException as e:  # noqa: BLE001 - top level: turn into an exit status
        inner = _unwrap(e)
        if isinstance(inner, StartupError):
            sys.stderr.write(f"molinkd: {inner}\n")
            return 1
        if isinstance(inner, KeyboardInterrupt):
            return 130
        from p2p.host import AllowListError, IdentityError, IdentityInUse, SwarmKeyError

        if isinstance(inner, (IdentityError, IdentityInUse, AllowListError, SwarmKeyError, OSError)):
            sys.stderr.write(f"molinkd: {type(inner).__name__}: {inner}\n")
            return 1
        raise
    return 0
