"""The pipeline head: a vLLM Executor running stage 0 in-process and the rest over frames.

The head peer owns layer 0 and runs vLLM's scheduler (EngineCore). vLLM is told the engine
is pipeline-parallel with ``depth`` stages, the pipeline depth (so the scheduler sends
``new_token_ids`` and keeps up to ``depth`` batches in flight), and :class:`PipelineExecutor` is
its executor:

- ``execute_model(so)`` runs the local stage-0 worker (layers ``[0, e)``), keeps its hidden
  states, and returns at once;
- ``sample_tokens(grammar)`` sends one ``eng.step`` frame (scheduler output + hidden states +
  grammar) to stage 1 and returns a Future that the reader thread completes when the last
  stage's ``eng.result`` comes back. With several batches in flight, stage 0 computes batch
  k+1 while the remote stages compute batch k;
- empty scheduler outputs (no tokens) are forwarded without hidden states and without a reply,
  so that finished requests are freed on every stage;
- KV cache: each stage reports its capacity in the handshake; every stage (the head too, via
  ``num_gpu_blocks_override``) uses the minimum;
- a lost tail (broken stream, ``eng.error``, a step past its :class:`~molinkd.engine.deadline.StepClock`
  deadline) is replaced without vLLM noticing: every sent step stays in a log until answered,
  answered ones feed a :class:`~molinkd.engine.mirror.RequestMirror`, and
  :mod:`molinkd.engine.failover` rebuilds a new tail from it and re-sends the log.

Pipeline depth is decoupled from the route length: vLLM's ``pipeline_parallel_size`` only sizes
its batch queue (``max_concurrent_batches``) and turns on ``new_token_ids`` in scheduler outputs;
workers get their layers and ranks from their span (``molinkd.spans``), never from it. The
scheduler (:mod:`molinkd.engine.microbatch`) splits the running requests into ``depth``
micro-batches so that the steps in flight carry work, not empty batches.

Build the engine with :func:`pipeline_engine_kwargs`; the executor reads its pipeline config
from ``vllm_config.additional_config["molink_pipeline"]`` (EngineCore runs in a spawned
process, so everything it needs travels inside the config).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from vllm.v1.executor.abstract import Executor

from molinkd.engine import pacing

log = logging.getLogger("molinkd.engine.head")

CONFIG_KEY = "molink_pipeline"
DEPTH_ENV = "MOLINK_PIPELINE_DEPTH"  # developer override of the default depth (benchmarks)


def default_depth(stages: int) -> int:
    """Micro-batches in flight for a route of ``stages``: one per stage (override with ``depth=``
    or $MOLINK_PIPELINE_DEPTH).

    Why not more: on CPU a step costs ``A + B * tokens`` per stage with a large fixed part ``A``
    (per-layer kernel and Python costs; about 0.5 ms per layer here), so every extra
    micro-batch pays ``A`` again. A cycle (a micro-batch's trip through every stage and link)
    takes ``stages * step + RTT``; each request gets one token per cycle, so with ``n``
    requests tokens/s <= n / (stages * step + RTT) whatever the depth, and a deeper pipeline
    only shrinks ``step`` a little while adding ``A`` per micro-batch. Measured with
    ``molink bench`` (2 stages, 1 core each, 16 requests): depth 2 / 3 / 6 gave 429 / 323 / 182
    tok/s on loopback and 188 / 190 / 147 with 50 ms RTT."""
    from molinkd.config import number_from_env

    depth = number_from_env(DEPTH_ENV, int, 2, None, "an integer >= 2 (the pipeline depth)")
    return max(2, stages) if depth is None else int(depth)


def pipeline_engine_kwargs(
    route: list[dict],
    *,
    model_hash: str = "",
    step_timeout: float = 120.0,
    connect_timeout: float = 30.0,
    open_timeout: float = 300.0,
    keepalive: float = 10.0,
    stats_path: str = "",
    depth: int | None = None,
    failover_wait: float = 30.0,
    audit_rate: float = 0.0,
    audit_tolerance: float = 2.0,
    route_wait: float = 0.0,
    expected_stages: int | None = None,
) -> dict:
    """Extra ``EngineArgs``/``LLM`` keyword arguments that make the engine a pipeline head.

    ``route`` is ``[{"peer", "addr", "start", "end"}, ...]`` head first (the head's ``addr`` is
    unused); spans must tile ``[0, L)``. Combine with the usual arguments (model, dtype,
    max_model_len, max_num_seqs, enforce_eager=True ...). ``depth``: micro-batches in flight (at
    least 2; default :func:`default_depth`). ``failover_wait``: how long in-engine failover
    (:mod:`molinkd.engine.failover`; routes of ``p2p:`` peers under a daemon) looks for a new tail
    before the pipeline fails; 0 disables it. ``audit_rate``: fraction of the auditable new requests
    whose first step is recomputed on a verifier route (:mod:`molinkd.engine.audit`; 0 disables it,
    it needs a daemon), ``audit_tolerance``: nats (see :func:`molinkd.audit.judge`).

    ``route_wait`` > 0 allows a route of the head's hop alone: the engine loads its own layers
    first, then asks its daemon for the rest of the route (the stages may still be loading),
    up to ``route_wait`` seconds; ``expected_stages`` (the route length the daemon expects) sizes
    the default depth meanwhile.
    """
    if len(route) < 2 and not (route_wait > 0 and len(route) == 1):
        raise ValueError("a pipeline route needs at least 2 stages; serve single-node otherwise")
    if route[0]["start"] != 0:
        raise ValueError("the head's span must start at layer 0")
    for a, b in itertools.pairwise(route):
        if a["end"] != b["start"]:
            raise ValueError(f"route spans {a['start']}:{a['end']} and {b['start']}:{b['end']} do not meet")
    depth = default_depth(max(len(route), expected_stages or 2)) if depth is None else int(depth)
    if depth < 2:
        raise ValueError(f"pipeline depth {depth}: at least 2 (vLLM sends sampled tokens back only when pipelined)")
    cfg = {
        "depth": depth,
        "route": [
            {"peer": str(h.get("peer", "")), "addr": str(h.get("addr", "")), "start": int(h["start"]), "end": int(h["end"])}
            for h in route
        ],
        "model_hash": model_hash,
        "step_timeout": step_timeout,
        "connect_timeout": connect_timeout,
        "open_timeout": open_timeout,
        "keepalive": keepalive,
        "stats_path": stats_path,
        "failover_wait": failover_wait,
        "audit_rate": float(audit_rate),
        "audit_tolerance": float(audit_tolerance),
        "route_wait": float(route_wait),
    }
    return {
        "distributed_executor_backend": PipelineExecutor,
        "pipeline_parallel_size": depth,
        "scheduler_cls": "molinkd.engine.microbatch.MicroBatchScheduler",
        "additional_config": {CONFIG_KEY: cfg},
        "enforce_eager": True,
        "async_scheduling": False,
    }


class StepStats:
    """Moving averages of per-stage compute time and of the remote round trip, written as JSON to
    ``path`` (at most once a second) for the daemon's /status. Thread-safe enough: one writer per
    field, readers only read the file."""

    def __init__(self, path: str, alpha: float = 0.2, depth: int | None = None) -> None:
        self.path = path
        self.depth = depth
        self.inflight_max = 0  # most steps seen in flight at once
        self.alpha = alpha
        self.stage_ms: dict[str, float] = {}
        self.round_trip_ms: float | None = None
        self.steps = 0
        self.failure: dict | None = None
        self.failovers: list[dict] = []  # the last few in-engine failovers (what, how long)
        self._last_write = 0.0

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def record(self, peer: str, ms: float) -> None:
        self.stage_ms[peer] = self._ewma(self.stage_ms.get(peer), ms)

    def record_result(self, timings: Any, sent_at: float | None, peers: frozenset[str] = frozenset()) -> None:
        """Count a step; take the stages' reported times only for ``peers`` (the route's), so a
        stage cannot fill the head's memory or its /status with invented peers."""
        self.steps += 1
        if isinstance(timings, list):
            for item in timings[:len(peers)]:
                if (isinstance(item, list) and len(item) == 2 and item[0] in peers
                        and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
                        and 0 <= item[1] < 1e7):
                    self.record(item[0], float(item[1]))
        if sent_at is not None:
            self.round_trip_ms = self._ewma(self.round_trip_ms, (time.perf_counter() - sent_at) * 1000)
        self._maybe_write()

    def record_failover(self, entry: dict) -> None:
        self.failovers = [*self.failovers[-7:], entry]
        self._maybe_write(force=True)

    def record_failure(self, message: str, peer: str | None) -> None:
        """Say why the pipeline died and which peer is to blame (None: unknown), for the daemon."""
        if self.failure is None:
            self.failure = {"message": message, "peer": peer}
            self._maybe_write(force=True)

    def _maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.path or (not force and now - self._last_write < 1.0):
            return
        self._last_write = now
        import json

        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump({"stage_ms": {k: round(v, 2) for k, v in self.stage_ms.items()},
                           "round_trip_ms": round(self.round_trip_ms or 0.0, 2), "steps": self.steps,
                           "depth": self.depth, "inflight_max": self.inflight_max,
                           "failure": self.failure, "failovers": self.failovers[-8:]}, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass


class PipelineError(RuntimeError):
    """A remote stage failed, timed out or went away; the session is dead."""


class PipelineExecutor(Executor):
    supports_pp = True

    # --- setup ---------------------------------------------------------------------------

    def _init_executor(self) -> None:
        from molinkd.engine import wire
        from molinkd.engine.link import FramedLink
        from molinkd.engine.stage import build_worker
        from molinkd.spans import Span

        cfg = (self.vllm_config.additional_config or {}).get(CONFIG_KEY)
        if not cfg:
            raise ValueError(f"PipelineExecutor needs additional_config[{CONFIG_KEY!r}] (use pipeline_engine_kwargs)")
        self.cfg = cfg
        self.route = cfg["route"]
        self.num_layers = self.model_config.get_total_num_hidden_layers()
        if len(self.route) > 1 and self.route[-1]["end"] != self.num_layers:
            raise ValueError(f"route ends at layer {self.route[-1]['end']}, the model has {self.num_layers}")
        self.step_timeout = float(cfg["step_timeout"])
        self.session = uuid.uuid4().hex
        self._dead: str | None = None
        # step -> (future, its scheduler output: the result is checked against it)
        self._futures: dict[int, tuple[Future, Any]] = {}
        self.limits: Any = None  # SessionLimits once the session is open
        self.auditor: Any = None  # molinkd.engine.audit.Auditor once the session is open (rate > 0)
        self._route_peers = frozenset(h["peer"] for h in self.route)
        self._lock = threading.Lock()
        self._control: queue.Queue = queue.Queue()
        self._step_ids = itertools.count(1)
        # steps run locally but not yet sent, oldest first: (step, body, so, head batch order); a
        # body with sample=True waits for sample_tokens (it needs the grammar output), empty steps
        # queued behind it keep their order (stages must see finished requests after that step)
        self._unsent: collections.deque[tuple[int, dict, Any, list]] = collections.deque()
        self._last_send = time.monotonic()
        # failover (molinkd.engine.failover): every step sent and not yet answered, the remote
        # stages' state after the last answered one, the head worker's batch after its last step
        from molinkd.engine.deadline import StepClock
        from molinkd.engine.mirror import RequestMirror

        self.clock = StepClock(initial=self.step_timeout)
        pacing.shared.slack = pacing.slack_from_env()
        self.mirror = RequestMirror()
        self._log: collections.deque = collections.deque()  # failover.Sent, oldest first
        self._send_lock = threading.RLock()  # the link, _log and _up change together
        self._worker_lock = threading.Lock()  # the stage-0 worker: engine thread or failover
        self._up = True  # steps go on the wire (False while failing over: they wait in _log)
        self._gen = 0  # link generation: a reader of an older link stops
        self._rebuild_steps: dict[int, int] = {}  # synthetic steps (-> tokens): results dropped
        self._head_state: tuple[list[str], dict[str, int]] = ([], {})
        self._last_result_at = 0.0
        self._failing_over = False
        self.failover_wait = 0.0  # set once the session is open (a failing start simply fails)
        self._stop = threading.Event()
        self.stats = {"steps": 0, "bytes_out": 0}
        self._sent_at: dict[int, float] = {}
        self.step_stats = StepStats(cfg.get("stats_path") or "", depth=cfg.get("depth"))

        # EngineCore runs in a process spawned by the daemon: it ends with the daemon and hears
        # no signal meant for the daemon's process group (the daemon drains, then stops it)
        from molinkd.engine.watchdog import bind_to_daemon

        bind_to_daemon()
        head = self.route[0]
        t0 = time.monotonic()
        self.worker = build_worker(self.vllm_config, Span(head["start"], head["end"]), self.num_layers)
        log.info("head stage %s:%s loaded in %.1fs", head["start"], head["end"], time.monotonic() - t0)
        from molinkd.engine import info

        info.report_loaded()
        if len(self.route) == 1:  # loaded while the stages load: now ask the daemon for them
            self.route = self._wait_for_route(float(cfg.get("route_wait") or 0.0))
            self._route_peers = frozenset(h["peer"] for h in self.route)
        try:
            first = self.route[1]
            self.link = FramedLink.connect(first["addr"], timeout=float(cfg["connect_timeout"]),
                                           span=(first["start"], first["end"]))
        except Exception as e:
            self.step_stats.record_failure(f"cannot connect to the first stage: {e}", self.route[1]["peer"])
            raise
        self._reader = threading.Thread(target=self._read_loop, args=(self.link, 0), name="molink-head-reader",
                                        daemon=True)
        self._reader.start()
        self._send(wire.HELLO, self._session_body(0))
        reply = self._await_control(wire.HELLO_OK, float(cfg["open_timeout"]))
        from molinkd.engine.admission import is_peer_id
        from molinkd.engine.wire import check_hello_ok

        try:
            named = all(is_peer_id(h["peer"]) for h in self.route[1:])  # not in local test harnesses
            self.remote_stages = check_hello_ok(reply, self.route, session=self.session, peers=named)["stages"]
        except Exception as e:
            msg = f"the pipeline answered the session hello with a bad stage list: {e}"
            self.step_stats.record_failure(msg, self.route[1]["peer"])
            raise PipelineError(msg) from None
        log.info("pipeline session %s: %s", self.session[:8], self.remote_stages)

    def _wait_for_route(self, wait: float) -> list[dict]:
        """The whole route from the daemon, asked once a second for up to ``wait`` s (the stages
        may still be loading their layers)."""
        from molinkd.engine.failover import RouteUnavailable, ask_route

        deadline = time.monotonic() + wait
        last = "no answer yet"
        while True:
            try:
                route = ask_route(self, set(), set())
                log.info("route after loading: %s", [f"{h['start']}:{h['end']}" for h in route])
                return route
            except (RouteUnavailable, OSError) as e:
                last = str(e)
            if time.monotonic() >= deadline:
                msg = f"no route within {wait:.0f}s of loading this head's layers: {last}"
                self.step_stats.record_failure(msg, None)
                raise PipelineError(msg)
            time.sleep(1.0)

    def _session_body(self, num_blocks: int, *, session: str | None = None, route: list[dict] | None = None) -> dict:
        from molinkd.engine import wire

        vc = self.vllm_config
        return wire.session_body(
            session=session or self.session,
            model_hash=self.cfg.get("model_hash", ""),
            route=route or self.route,
            num_layers=self.num_layers,
            dtype=str(vc.model_config.dtype).removeprefix("torch."),
            max_model_len=vc.model_config.max_model_len,
            max_num_seqs=vc.scheduler_config.max_num_seqs,
            max_num_batched_tokens=vc.scheduler_config.max_num_batched_tokens,
            block_size=vc.cache_config.block_size or 0,
            num_blocks=num_blocks,
        )

    def determine_available_memory(self) -> list[int]:
        local = self.worker.max_kv_blocks()
        remote = [int(s["max_blocks"]) for s in self.remote_stages]
        agreed = min([local, *remote])
        log.info("KV blocks: head %d, stages %s -> %d everywhere", local, remote, agreed)
        self.cache_config.num_gpu_blocks_override = agreed
        return [self.worker._kv_mem]

    def initialize_from_config(self, kv_cache_configs: list) -> None:
        from molinkd.engine import wire

        cfg = kv_cache_configs[0]
        self._send(wire.OPEN, self._session_body(cfg.num_blocks))
        reply = self._await_control(wire.OPEN_OK, float(self.cfg["open_timeout"]))
        try:
            wire.check_open_ok(reply, session=self.session, num_blocks=cfg.num_blocks)
        except Exception as e:
            msg = f"the pipeline answered the session open badly: {e}"
            self.step_stats.record_failure(msg, self.route[-1]["peer"])
            raise PipelineError(msg) from None
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.worker.initialize_from_config(cfg)
        self.worker.kv_blocks = cfg.num_blocks
        self.num_blocks = cfg.num_blocks
        from molinkd.limits import session_limits

        self.limits = session_limits(self.vllm_config, cfg.num_blocks)
        # in-engine failover needs the daemon (routes, dials): not for routes of plain addresses
        if os.environ.get("MOLINK_P2P_DIAL") and all(h["addr"].startswith("p2p:") for h in self.route[1:]):
            self.failover_wait = float(self.cfg.get("failover_wait", 30.0))
            rate = float(self.cfg.get("audit_rate") or 0.0)
            if rate > 0:
                from molinkd.engine.audit import Auditor

                self.auditor = Auditor(self, rate=rate, tolerance=float(self.cfg.get("audit_tolerance", 2.0)))

    # --- worker calls ----------------------------------------------------------------------

    def collective_rpc(  # type: ignore[override]
        self,
        method: str | Callable,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
        single_value: bool = False,
    ) -> Any:
        """Run ``method`` on the local stage-0 worker. Remote stages follow the session protocol
        (they are configured by the handshake and driven by step frames), not RPCs."""
        from vllm.config import set_current_vllm_config
        from vllm.v1.serial_utils import run_method

        with set_current_vllm_config(self.vllm_config):
            try:
                result = run_method(self.worker, method, args, kwargs or {})
            except Exception as e:
                if not non_block:
                    raise
                fut: Future = Future()
                fut.set_exception(e)
                return fut
        value = result if single_value else [result]
        if non_block:
            fut = Future()
            fut.set_result(value)
            return fut
        return value

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:  # type: ignore[override]
        from molinkd.engine import schedwire
        from p2p.tensors import to_wire

        self.check_health()
        if scheduler_output.total_num_scheduled_tokens == 0 and not self._unsent and says_nothing(scheduler_output):
            # vLLM fills free batch-queue slots with empty steps; one that frees nothing and
            # schedules nothing changes no worker's state: it costs a frame and a step on every
            # stage for nothing
            from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

            self.stats["empty_skipped"] = self.stats.get("empty_skipped", 0) + 1
            out = EMPTY_MODEL_RUNNER_OUTPUT
            if non_block:
                done: Future = Future()
                done.set_result(out)
                return done
            return out
        step = next(self._step_ids)
        sched = schedwire.encode_scheduler_output(scheduler_output)
        t0 = time.perf_counter()
        with self._worker_lock:
            out = self.worker.execute_model(scheduler_output)
            hidden = self.worker.mailbox.take_outbox()
            order = self._note_head_state(scheduler_output)
        self.step_stats.record(self.route[0]["peer"], (time.perf_counter() - t0) * 1000)
        if self.auditor is not None:
            self.auditor.consider(step, scheduler_output, order, hidden)
        wire_hidden = None if hidden is None else {k: to_wire(v) for k, v in hidden.items()}
        if scheduler_output.total_num_scheduled_tokens == 0:
            body = {"step": step, "sched": sched, "grammar": None, "hidden": None, "sample": False}
            if self._unsent:
                self._unsent.append((step, body, scheduler_output, order))
            else:
                self._transmit(step, body, scheduler_output, order)
            result = out
        else:
            if wire_hidden is None:
                raise PipelineError("stage 0 produced no hidden states for a non-empty step")
            self._unsent.append((step, {"step": step, "sched": sched, "grammar": None, "hidden": wire_hidden,
                                        "sample": True}, scheduler_output, order))
            result = None
        if non_block:
            fut: Future = Future()
            fut.set_result(result)
            return fut
        return result

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:  # type: ignore[override]
        from molinkd.engine import schedwire

        if not self._unsent or not self._unsent[0][1]["sample"]:
            raise PipelineError("sample_tokens called without a preceding non-empty execute_model")
        step, body, so, order = self._unsent.popleft()
        body["grammar"] = schedwire.encode_grammar_output(grammar_output)
        fut: Future = Future()
        with self._lock:
            self._futures[step] = (fut, so)
            if len(self._futures) > self.step_stats.inflight_max:
                self.step_stats.inflight_max = len(self._futures)
        self._transmit(step, body, so, order)
        while self._unsent and not self._unsent[0][1]["sample"]:
            self._transmit(*self._unsent.popleft())
        self.stats["steps"] += 1
        if non_block:
            return fut
        return fut.result()

    def take_draft_token_ids(self) -> Any:
        return None

    def check_health(self) -> None:
        if self._dead:
            raise PipelineError(self._dead)

    def shutdown(self) -> None:
        from molinkd.engine import wire

        self._stop.set()
        link = getattr(self, "link", None)
        if link is not None:
            with contextlib.suppress(Exception):
                self._send(wire.CLOSE, {"session": self.session})
            with contextlib.suppress(Exception):
                link.close()
        if not self._dead:
            self._dead = "executor shut down"
        self._fail_all("executor shut down")
        worker = getattr(self, "worker", None)
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.shutdown()

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return False

    # --- link plumbing -------------------------------------------------------------------

    def _send(self, t: str, body: Any) -> None:
        self.link.send(t, body, timeout=self.step_timeout)
        self._last_send = time.monotonic()

    def _transmit(self, step: int, body: dict, so: Any, order: list[str]) -> None:
        """Send a step down the pipeline, or keep it for after the failover in progress. Every
        step stays in the log until a result at or after it arrives (then the mirror takes it)."""
        from molinkd.engine import wire
        from molinkd.engine.failover import Sent

        with self._send_lock:
            now = time.monotonic()
            self._log.append(Sent(step, body, so, order))
            if body["sample"]:
                self._sent_at[step] = now
            if not self._up:
                return
            try:
                self.link.send(wire.STEP, body, timeout=self.step_timeout)
                self._last_send = now
            except Exception as e:
                self._lost(f"sending step {step} failed: {e}", avoid=[h["peer"] for h in self.route[1:2]])

    def _note_head_state(self, so: Any) -> list[str]:
        """After the stage-0 worker ran ``so``: its batch order and each batched request's KV
        length (a failover puts the worker's batch back to exactly this)."""
        runner = self.worker.model_runner
        order = [r for r in runner.input_batch.req_ids if r is not None]
        sched = so.num_scheduled_tokens
        computed = {r.req_id: r.num_computed_tokens + sched.get(r.req_id, 0) for r in so.scheduled_new_reqs}
        c = so.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            computed[rid] = c.num_computed_tokens[i] + sched.get(rid, 0)
        self._head_state = (order, {rid: computed.get(rid, 0) for rid in order})
        return order

    def _commit(self, step: int, out: Any, gen: int) -> bool:
        """The result of ``step`` arrived on link ``gen``: every step up to it is now the stages'
        past state. False if that link was replaced meanwhile (the step will be re-sent)."""
        with self._send_lock:
            if gen != self._gen:
                return False
            while self._log and self._log[0].step <= step:
                e = self._log.popleft()
                self.mirror.apply_step(e.so, e.order)
            self.mirror.apply_result(out)
            return True

    def _lost(self, msg: str, culprit: str | None = None, *, avoid: list[str] | tuple = ()) -> None:
        """The current link is unusable: fail over to a new tail (in a thread), or fail."""
        from molinkd.engine.failover import start_failover

        if self._stop.is_set():
            return
        with self._send_lock:
            if self._failing_over or self._dead:
                return
            if self.failover_wait <= 0:
                self._fail(msg, culprit)
                return
            self._failing_over = True
            self._up = False
            self._gen += 1
        log.warning("pipeline lost (%s); failing over", msg)
        start_failover(self, msg, culprit, list(avoid), detected_at=time.time())

    def _await_control(self, t: str, timeout: float) -> dict:
        from molinkd.engine import wire

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PipelineError(f"no {t} from the pipeline within {timeout}s")
            try:
                ft, body = self._control.get(timeout=min(left, 1.0))
            except queue.Empty:
                self.check_health()
                continue
            if ft == wire.ERROR:
                msg = f"stage {body.get('stage')} refused the session: {body.get('message')}"
                self.step_stats.record_failure(msg, self._stage_peer(body.get("stage")))
                raise PipelineError(msg)
            if ft == t:
                return body
            log.warning("ignoring unexpected %s while waiting for %s", ft, t)

    def _read_loop(self, link: Any, gen: int) -> None:
        from molinkd.engine import schedwire, wire
        from molinkd.engine.link import LinkTimeout

        keepalive = float(self.cfg.get("keepalive", 10.0))
        nonce = itertools.count()

        def current() -> bool:
            return gen == self._gen and not self._stop.is_set()

        while current():
            try:
                f = link.recv(timeout=0.5)
            except LinkTimeout:
                if not current():
                    return
                now = time.monotonic()
                late = self._late_step(now)
                if late is not None:
                    step, waited, budget = late
                    # a hung stage says nothing: suspect the whole tail (it is rebuilt anyway)
                    self._lost(f"step {step} got no result within {budget:.1f}s (waited {waited:.1f}s)",
                               avoid=[h["peer"] for h in self.route[1:]])
                    return
                if now - self._last_send > keepalive and self._up:
                    with contextlib.suppress(Exception):
                        self._send(wire.PING, {"nonce": next(nonce)})
                continue
            except Exception as e:
                if current():
                    # the first stage is the only peer we talk to: a broken stream or a malformed
                    # frame is on it (further stages report their failures as eng.error frames)
                    self._lost(f"pipeline connection lost: {e}", avoid=[self.route[1]["peer"]])
                return
            if not current():
                return
            if f.type == wire.RESULT:
                step = f.get("step")
                if step in self._rebuild_steps:
                    now = time.monotonic()
                    tokens = self._rebuild_steps.pop(step)
                    sent = self._sent_at.pop(step, None)
                    if sent is not None:
                        self.clock.observe(tokens, now - max(sent, self._last_result_at))
                    self._last_result_at = now
                    continue
                with self._lock:
                    entry = self._futures.pop(step, None)
                if entry is None:
                    log.warning("result for unknown step %r", step)
                    continue
                now = time.monotonic()
                sent = self._sent_at.pop(step, None)
                if sent is not None:
                    took = now - max(sent, self._last_result_at)
                    self.clock.observe(entry[1].total_num_scheduled_tokens, took)
                    pacing.shared.observe(pacing.prompt_tokens_of(entry[1].num_scheduled_tokens), took)
                self._last_result_at = now
                self.step_stats.record_result(f.get("timings"), None if sent is None else
                                              time.perf_counter() - (now - sent), self._route_peers)
                try:
                    out = schedwire.decode_model_runner_output(f.get("output"))
                    schedwire.check_model_runner_output(out, entry[1], self.limits)
                except Exception as e:
                    # the last stage sampled it; the stages between only relay it
                    msg = f"bad result for step {step} from the last stage: {e}"
                    with self._lock:
                        self._futures[step] = entry
                    self._lost(msg, self.route[-1]["peer"])
                    return
                try:
                    if not self._commit(step, out, gen):
                        with self._lock:
                            self._futures[step] = entry
                        return
                except Exception as e:  # the mirror lost track: no failover possible any more
                    log.error("request mirror failed at step %s: %s", step, e)
                    self.failover_wait = 0.0
                if self.auditor is not None:
                    self.auditor.on_result(step, out)
                entry[0].set_result(out)
            elif f.type == wire.ERROR:
                msg = f"stage {f.get('stage')} failed at step {f.get('step')}: {f.get('message')}"
                self._control.put((f.type, f.body))
                self._lost(msg, self._stage_peer(f.get("stage")))
                return
            elif f.type == wire.PONG:
                continue
            else:
                self._control.put((f.type, f.body))

    def _late_step(self, now: float) -> tuple[int, float, float] | None:
        """(step, seconds waited, budget) of the oldest unanswered step if it is past its budget.
        Its clock starts when it was sent or when the step before it was answered."""
        if not self._up:
            return None
        rebuilding = dict(self._rebuild_steps)
        if rebuilding:  # steps re-sent after a failover queue behind the rebuild steps
            step = min(rebuilding)
            tokens = rebuilding[step]
        else:
            with self._lock:
                if not self._futures:
                    return None
                step = min(self._futures)
                tokens = self._futures[step][1].total_num_scheduled_tokens
        sent = self._sent_at.get(step)
        if sent is None:
            return None
        waited = now - max(sent, self._last_result_at)
        # the tight, measured budget only where a late step can be recovered inside the engine
        # (failover under a daemon); elsewhere a slow step on a loaded machine (a big prompt-logprobs
        # prefill, say) must not end the pipeline: the fixed step_timeout applies
        budget = self.clock.budget(tokens) if self.failover_wait > 0 else self.step_timeout
        return (step, waited, budget) if waited > budget else None

    def _stage_peer(self, index: Any) -> str | None:
        if isinstance(index, int) and not isinstance(index, bool) and 0 < index < len(self.route):
            return self.route[index]["peer"]
        return None

    def _fail(self, msg: str, culprit: str | None = None) -> None:
        log.error("pipeline failed: %s", msg)
        self.step_stats.record_failure(msg, culprit)
        if not self._dead:
            self._dead = msg
        self._fail_all(msg)

    def _fail_all(self, msg: str) -> None:
        with self._lock:
            items = list(self._futures.values())
            self._futures.clear()
        for fut, _ in items:
            if not fut.done():
                fut.set_exception(PipelineError(msg))


def says_nothing(so: Any) -> bool:
    """Whether a scheduler output with no tokens also frees, preempts, zeroes and copies nothing
    (then no worker needs to see it)."""
    cached = so.scheduled_cached_reqs
    return not (so.scheduled_new_reqs or cached.req_ids or so.finished_req_ids or so.free_encoder_mm_hashes
                or so.preempted_req_ids or so.new_block_ids_to_zero or so.kv_cache_block_copies
                or so.scheduled_encoder_inputs or so.scheduled_spec_decode_tokens)
