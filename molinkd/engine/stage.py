"""The stage worker: vLLM computing one contiguous layer span, fed and drained by frames.

Two pieces:

- :class:`StageWorker`: vLLM's platform worker (``CPUWorker``, or ``Worker`` on GPU: chosen in
  :func:`worker_base_class`, the only place that decides) with its pipeline group replaced by
  :class:`StageGroup`, a ``GroupCoordinator`` stand-in with ``use_cpu_custom_send_recv = True``.
  vLLM then hands hidden states to :class:`Mailbox` (its "device communicator") instead of
  torch.distributed; the caller moves them between the mailbox and the wire. Local world size 1.
- :class:`StageServer`: the stage process's loop. It accepts one upstream connection at a time
  (the previous hop), dials the next hop, runs each ``eng.step`` frame through the worker and
  forwards the hidden states (or, on the last stage, samples and replies). See
  :mod:`molinkd.engine.wire` for the frames.

Run: ``python -m molinkd.engine.stage --model DIR --layers 15:30 --listen tcp:127.0.0.1:7001``
(``--next ADDR`` for a middle stage; otherwise the next hop's address comes from the route in
the session handshake).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from molinkd.spans import PipelinePlacement, Span, parse_span, pipeline_placement
from p2p.framing import FrameError

log = logging.getLogger("molinkd.engine.stage")


def worker_base_class() -> type:
    """vLLM's worker class for this platform (the one place the choice is made)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    return Worker


class Mailbox:
    """Device-communicator stand-in: vLLM's pipeline send/recv land here (synchronously)."""

    supports_tensor_dict = True

    def __init__(self) -> None:
        self.inbox: dict[str, Any] | None = None
        self.outbox: dict[str, Any] | None = None

    def send_tensor_dict(self, tensor_dict: dict[str, Any], dst: int) -> None:
        self.outbox = dict(tensor_dict)

    def recv_tensor_dict(self, src: int) -> dict[str, Any]:
        d, self.inbox = self.inbox, None
        if d is None:
            raise RuntimeError("vLLM asked for hidden states but none arrived with this step")
        return d

    def take_outbox(self) -> dict[str, Any] | None:
        d, self.outbox = self.outbox, None
        return d

    def destroy(self) -> None:
        pass


def make_stage_group(placement: PipelinePlacement, mailbox: Mailbox) -> Any:
    """A GroupCoordinator that says "rank r of n" and routes send/recv to ``mailbox``."""
    from vllm.distributed.parallel_state import GroupCoordinator

    class StageGroup(GroupCoordinator):
        def __init__(self) -> None:  # no process groups: nothing here is collective
            self.unique_name = "pp:molink"
            self.rank = placement.rank
            self.ranks = list(range(placement.size))
            self.world_size = placement.size
            self.rank_in_group = placement.rank
            self.local_rank = 0
            self.cpu_group = None
            self.device_group = None
            self.device_communicator = mailbox
            self.use_cpu_custom_send_recv = True
            self.use_device_communicator = True
            self.mq_broadcaster = None
            self.use_custom_op_call = False

        def destroy(self) -> None:
            pass

    return StageGroup()


def _base():  # evaluated once at import: the class statement needs a concrete base
    return worker_base_class()


class StageWorker(_base()):  # type: ignore[misc]
    """vLLM worker computing only ``span`` (see module docstring).

    Extra constructor keywords: ``span`` (Span), ``num_layers`` (int).
    """

    def __init__(self, *args: Any, span: Span, num_layers: int, **kwargs: Any) -> None:
        self.span = span
        self.placement = pipeline_placement(span, num_layers)
        self.mailbox = Mailbox()
        super().__init__(*args, **kwargs)

    @property
    def is_first(self) -> bool:
        return self.placement.is_first

    @property
    def is_last(self) -> bool:
        return self.placement.is_last

    def init_device(self) -> None:
        # vLLM's distributed init must see a world of 1 (this process alone), whatever pipeline
        # size the head's scheduler config says; then our group stands in for the pipeline.
        pc = self.parallel_config
        saved = (pc.pipeline_parallel_size, pc.world_size)
        pc.pipeline_parallel_size, pc.world_size = 1, 1
        try:
            super().init_device()
        finally:
            pc.pipeline_parallel_size, pc.world_size = saved
        if self.placement.partition:
            os.environ["VLLM_PP_LAYER_PARTITION"] = self.placement.partition
        else:
            os.environ.pop("VLLM_PP_LAYER_PARTITION", None)
        from vllm.distributed import parallel_state

        if self.placement.size > 1:
            parallel_state._PP = make_stage_group(self.placement, self.mailbox)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        if not self.is_first and getattr(runner, "intermediate_tensors", None) is None:
            # the CPU runner skips the dummy run that allocates these
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
            )

    # --- KV cache ----------------------------------------------------------------------

    def max_kv_blocks(self) -> int:
        """How many KV blocks this stage could hold (for the session's minimum)."""
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

        cc = self.vllm_config.cache_config
        saved, cc.num_gpu_blocks_override = cc.num_gpu_blocks_override, None
        try:
            specs = self.get_kv_cache_spec()
            self._resolve_kv_layout(specs)
            mem = self.determine_available_memory()
            cfg = get_kv_cache_configs(self.vllm_config, [specs], [mem])[0]
        finally:
            cc.num_gpu_blocks_override = saved
        self._kv_specs, self._kv_mem = specs, mem
        n = cfg.num_blocks
        return n if saved is None else min(n, saved)

    def _resolve_kv_layout(self, specs: dict) -> None:
        """What EngineCore does before sizing the cache (the head's EngineCore already did)."""
        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
        from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs

        try:
            self.vllm_config.cache_config.get_resolved_kv_cache_layout()
            return
        except ValueError:
            pass
        register_all_kvcache_specs(self.vllm_config)
        layout = resolve_kv_cache_layout(
            self.vllm_config, [self.get_supported_kv_cache_layouts()], list(specs.values())
        )
        self.set_kv_cache_layout(layout.name)

    def allocate_kv(self, num_blocks: int) -> None:
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

        self.vllm_config.cache_config.num_gpu_blocks_override = num_blocks
        cfg = get_kv_cache_configs(self.vllm_config, [self._kv_specs], [self._kv_mem])[0]
        if cfg.num_blocks != num_blocks:
            raise RuntimeError(f"stage could only allocate {cfg.num_blocks} KV blocks, {num_blocks} agreed")
        cfg.kv_cache_layout = self.vllm_config.cache_config.kv_cache_layout
        self.initialize_from_config(cfg)
        self.compile_or_warm_up_model()
        self.kv_blocks = num_blocks

    def forget_all_requests(self) -> None:
        """Drop every request's state (a session ended or its head died)."""
        from vllm.v1.core.sched.output import SchedulerOutput

        reqs = list(getattr(self.model_runner, "requests", {}).keys())
        if reqs:
            so = SchedulerOutput.make_empty()
            so.finished_req_ids = set(reqs)
            self.execute_model(so)


def build_worker(vllm_config: Any, span: Span, num_layers: int, *, distributed_init_method: str | None = None) -> StageWorker:
    """Construct, init and load a :class:`StageWorker` (no KV cache yet)."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.network_utils import get_distributed_init_method, get_open_port

    init = distributed_init_method or get_distributed_init_method("127.0.0.1", get_open_port())
    # what vLLM's WorkerWrapperBase.init_worker does before building a worker: without the
    # platform's kernel overrides the CPU path launches Triton kernels it cannot run
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    current_platform.register_triton_kernel_overrides()
    with set_current_vllm_config(vllm_config):
        w = StageWorker(
            vllm_config=vllm_config,
            local_rank=0,
            rank=0,
            distributed_init_method=init,
            is_driver_worker=True,
            span=span,
            num_layers=num_layers,
        )
        w.init_device()
        w.load_model()
    current_platform.update_block_size_for_backend(vllm_config)
    return w


# --- the stage process's server loop -------------------------------------------------------


class SessionError(RuntimeError):
    pass


PREEMPT_IDLE = 2.0  # seconds of upstream silence after which a newer session may replace the open one
PREEMPT_WAIT = 60.0


class StageServer:
    """Serve sessions for one :class:`StageWorker` (one upstream connection at a time).

    Every wait has a deadline: upstream silence beyond ``idle_timeout`` ends the session (the
    head pings every few seconds when idle), dials give up after ``connect_timeout``.
    """

    def __init__(
        self,
        worker: StageWorker,
        *,
        num_layers: int,
        model_hash: str,
        dtype: str,
        next_addr: str | None = None,
        peer_id: str = "",
        idle_timeout: float = 120.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self.worker = worker
        self.num_layers = num_layers
        self.model_hash = model_hash
        self.dtype = dtype
        self.next_addr = next_addr
        self.peer_id = peer_id
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.steps = 0
        self._index = -1  # this stage's position in the current session's route
        self._session: Any = None  # SessionLimits once the session is open
        self._down: Any = None  # the current session's link to the next stage
        self._last_frame_at = 0.0  # when the current session's upstream last sent a frame

    def serve_forever(self, lsock: socket.socket, *, stop: threading.Event | None = None) -> None:
        """Accept upstream connections, one session at a time. Under a daemon every connection is
        a session its daemon admitted (while a session is open, only the same head's), so a new
        one while a session is open means that head replaced its route (in-engine failover): the
        old session's upstream may be a hung peer that never closes it. Once the old session has
        been silent for ``PREEMPT_IDLE`` seconds (a live head's steps and pings keep it busier), it
        is closed and the new one starts; a new connection waits at most ``PREEMPT_WAIT``."""
        from molinkd.engine.link import FramedLink

        lsock.settimeout(1.0)
        current: tuple[Any, threading.Thread] | None = None
        while stop is None or not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            if current is not None:
                old_up, old_thread = current
                deadline = time.monotonic() + PREEMPT_WAIT
                while old_thread.is_alive() and time.monotonic() < deadline:
                    if time.monotonic() - self._last_frame_at >= PREEMPT_IDLE:
                        log.info("a new upstream connection replaces a silent session")
                        old_up.close()
                        self._close_down()
                        old_thread.join(timeout=30)
                        break
                    old_thread.join(timeout=0.2)
                if old_thread.is_alive():
                    log.warning("the open session is still busy; dropping the new upstream connection")
                    conn.close()
                    continue
            up = FramedLink(conn, peer="upstream")
            t = threading.Thread(target=self._session_thread, args=(up,), name="stage-session", daemon=True)
            current = (up, t)
            t.start()

    def _session_thread(self, up: Any) -> None:
        try:
            self.serve_session(up)
        except Exception:
            log.exception("session ended with an error")
        finally:
            up.close()
            with contextlib.suppress(Exception):
                self.worker.forget_all_requests()

    def _close_down(self) -> None:
        down = self._down
        if down is not None:
            with contextlib.suppress(Exception):
                down.close()

    def serve_session(self, up: Any) -> None:
        """Serve one upstream connection: one session (hello, open, steps, close).

        Under a daemon (``peer_id`` set) the first frame is ``p2p.from {peer}``, written by the
        daemon with the authenticated peer that opened the libp2p stream; every hello/open is then
        admitted against it (:mod:`molinkd.engine.admission`), steps are accepted only once the
        session is open, and each step is checked against the session's limits before vLLM sees it.
        """
        from molinkd.engine import wire
        from molinkd.engine.admission import AdmissionError, admit, same_session
        from molinkd.engine.link import P2P_FROM, LinkClosed

        down: Any = None
        relay: threading.Thread | None = None
        opener: str | None = None
        admitted: Any = None
        self._session = None
        self._last_frame_at = time.monotonic()
        if self.peer_id:
            f = up.recv(timeout=self.idle_timeout)
            peer = f.get("peer")
            if f.type != P2P_FROM or not isinstance(peer, str):
                log.warning("dropping a connection that did not come through the daemon (%s)", f.type[:40])
                return
            opener = peer
        try:
            while True:
                f = up.recv(timeout=self.idle_timeout)
                self._last_frame_at = time.monotonic()
                try:
                    if f.type == wire.CLOSE:
                        if down is not None:
                            down.send(wire.CLOSE, f.body)
                        return
                    if f.type == wire.STEP:
                        if self._session is None:
                            raise SessionError("a step arrived before the session was opened")
                        self._step(f.body, up, down)
                    elif f.type == wire.PING:
                        if admitted is None:
                            raise SessionError("a ping arrived before a session hello")
                        if down is not None:
                            down.send(wire.PING, f.body)
                        else:
                            up.send(wire.PONG, f.body)
                    elif f.type in (wire.HELLO, wire.OPEN):
                        body = f.body
                        now = admit(body, me=self.peer_id, span=(self.worker.span.start, self.worker.span.end),
                                    num_layers=self.num_layers, model_hash=self.model_hash, opener=opener)
                        if admitted is not None:
                            same_session(admitted, body)
                        admitted = now
                        self._index = now.index
                        self._check_session(body)
                        if f.type == wire.HELLO:
                            body["stages"].append(self._describe(body))
                        else:
                            self._open(body)
                        if self.worker.is_last:
                            if f.type == wire.HELLO:
                                up.send(wire.HELLO_OK, {"session": body["session"], "stages": body["stages"]})
                            else:
                                up.send(wire.OPEN_OK, {"session": body["session"], "num_blocks": body["num_blocks"]})
                        else:
                            if down is None:
                                down, relay = self._dial_next(body, up)
                                self._down = down
                            body["stage"] += 1
                            down.send(f.type, body)
                    else:
                        raise SessionError(f"unexpected frame {f.type[:40]!r} from upstream")
                except LinkClosed:
                    raise
                except Exception as e:
                    if isinstance(e, (AdmissionError, SessionError, FrameError)):
                        log.warning("stage refused %s: %s", f.type[:40], e)
                    else:
                        log.exception("stage failed on %s", f.type[:40])
                    step = f.body.get("step") if isinstance(f.body, dict) else None
                    with contextlib.suppress(Exception):
                        up.send(wire.ERROR, {"step": step if isinstance(step, int) else None,
                                             "stage": self._index, "message": f"{type(e).__name__}: {e}"})
                    return
        finally:
            self._session = None
            self._down = None
            if down is not None:
                down.close()
            if relay is not None:
                relay.join(timeout=5)

    # --- handlers ---

    def _check_session(self, b: dict) -> None:
        """The head's engine settings must fit this stage's (admission checked who and what)."""
        if b["dtype"] != self.dtype:
            raise SessionError(f"dtype mismatch: head {b['dtype']}, stage {self.dtype}")
        sc = self.worker.vllm_config.scheduler_config
        mc = self.worker.vllm_config.model_config
        if not 1 <= b["max_num_seqs"] <= sc.max_num_seqs or not 1 <= b["max_num_batched_tokens"] <= sc.max_num_batched_tokens:
            raise SessionError(
                f"head schedules up to {b['max_num_seqs']} seqs/{b['max_num_batched_tokens']} tokens, "
                f"stage allows {sc.max_num_seqs}/{sc.max_num_batched_tokens}: start the stage with larger limits"
            )
        if not 1 <= b["max_model_len"] <= mc.max_model_len:
            raise SessionError(f"head max_model_len {b['max_model_len']} outside 1..{mc.max_model_len} (this stage's)")
        bs = self.worker.vllm_config.cache_config.block_size
        if b["block_size"] != bs:
            raise SessionError(f"block size mismatch: head {b['block_size']}, stage {bs}")

    def _describe(self, b: dict) -> dict:
        return {
            "index": b["stage"],
            "start": self.worker.span.start,
            "end": self.worker.span.end,
            "max_blocks": self.worker.kv_blocks,
            "peer": self.peer_id,
        }

    def _open(self, b: dict) -> None:
        """Start a session on the KV cache allocated at start-up (its full size: a session's block
        count only bounds the block ids it may use, so no session can shrink the cache for the
        next one)."""
        from molinkd.limits import session_limits

        have = self.worker.kv_blocks
        num_blocks = b["num_blocks"]
        if not 1 <= num_blocks <= have:
            raise SessionError(f"{num_blocks} KV blocks asked, this stage holds 1..{have}")
        self.worker.forget_all_requests()
        # this stage's model (vocabulary, width), the session's agreed bounds (checked against ours)
        self._session = session_limits(
            self.worker.vllm_config, num_blocks, block_size=b["block_size"], max_num_seqs=b["max_num_seqs"],
            max_num_batched_tokens=b["max_num_batched_tokens"], max_model_len=b["max_model_len"], dtype=b["dtype"])

    def _dial_next(self, b: dict, up: Any) -> tuple[Any, threading.Thread]:
        from molinkd.engine.admission import next_hop_addr
        from molinkd.engine.link import FramedLink

        addr, span = next_hop_addr(b, self.next_addr)
        try:
            down = FramedLink.connect(addr, timeout=self.connect_timeout, span=span)
        except (OSError, ValueError) as e:  # LinkClosed included: it is the next hop's, not upstream's
            raise SessionError(f"cannot reach the next stage {addr[:60]}: {e}") from None
        t = threading.Thread(target=_relay_replies, args=(down, up, b["stage"]), name="stage-relay", daemon=True)
        t.start()
        return down, t

    def _step(self, b: dict, up: Any, down: Any) -> None:
        from molinkd.engine import schedwire, wire
        from p2p.tensors import from_wire, to_wire

        wire.check_step_body(b)
        t0 = time.perf_counter()
        so = schedwire.decode_scheduler_output(b["sched"])
        schedwire.check_scheduler_output(so, self._session)
        w = self.worker
        hidden = {k: from_wire(v) for k, v in b["hidden"].items()} if b.get("hidden") else None
        if so.total_num_scheduled_tokens > 0:
            schedwire.check_hidden_states(hidden or {}, so, self._session)
            w.mailbox.inbox = hidden
        elif hidden:
            raise SessionError("an empty step carried hidden states")
        out = w.execute_model(so)
        self.steps += 1
        if not w.is_last:
            hidden = w.mailbox.take_outbox()
            if so.total_num_scheduled_tokens > 0 and hidden is None:
                raise SessionError("the model produced no hidden states for a non-empty step")
            b["hidden"] = None if hidden is None else {k: to_wire(v) for k, v in hidden.items()}
            self._add_timing(b, t0)
            down.send(wire.STEP, b)
            return
        if not b["sample"]:
            return
        if out is None:
            out = w.sample_tokens(schedwire.decode_grammar_output(b.get("grammar")))
        if hasattr(out, "get_output"):
            out = out.get_output()
        self._add_timing(b, t0)
        up.send(wire.RESULT, {"step": b["step"], "output": schedwire.encode_model_runner_output(out),
                              "timings": b["timings"]})

    def _add_timing(self, b: dict, t0: float) -> None:
        """Append this stage's compute time to the step (the head shows per-stage step times)."""
        timings = b.get("timings")
        if not isinstance(timings, list):
            timings = b["timings"] = []
        timings.append([self.peer_id, round((time.perf_counter() - t0) * 1000, 3)])


def _relay_replies(down: Any, up: Any, index: int) -> None:
    """Copy reply frames from the next hop (route entry ``index + 1``) back to the previous one until
    the link ends. An error frame that blames a stage at or before this one is the next stage's
    lie (it only sees its own side): the blame is put back on the next stage."""
    from molinkd.engine import wire
    from molinkd.engine.link import LinkClosed, LinkTimeout

    def report(message: str) -> None:
        with contextlib.suppress(Exception):
            up.send(wire.ERROR, {"step": None, "stage": index + 1, "message": message})

    while True:
        try:
            f = down.recv(timeout=1.0)
        except LinkTimeout:
            continue
        except (LinkClosed, OSError):
            return
        except Exception as e:  # malformed frame from downstream: report it upstream
            report(f"bad frame from the next stage: {e}")
            return
        if f.type not in wire.REPLY_TYPES:
            report(f"the next stage sent {f.type[:40]!r}")
            return
        body = f.body
        if f.type == wire.ERROR:
            blamed = body.get("stage") if isinstance(body, dict) else None
            if not isinstance(blamed, int) or isinstance(blamed, bool) or blamed <= index:
                report(f"the next stage failed: {str(body.get('message') if isinstance(body, dict) else body)[:500]}")
                return
        try:
            up.send(f.type, body)
        except Exception:
            return


# --- process entry point --------------------------------------------------------------------


def engine_args_for_stage(model: str, *, dtype: str, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int | None, block_size: int | None, kv_cache_gib: float = 1.0) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    from molinkd.engine.kvcache import kv_cache_kwargs

    kw: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        async_scheduling=False,
        disable_log_stats=True,
    )
    if max_num_batched_tokens:
        kw["max_num_batched_tokens"] = max_num_batched_tokens
    if block_size:
        kw["block_size"] = block_size
    kw.update(kv_cache_kwargs(kv_cache_gib))
    return EngineArgs(**kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m molinkd.engine.stage", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--layers", required=True, help="span S:E (half-open) or A,B (inclusive)")
    p.add_argument("--listen", required=True, help="tcp:HOST:PORT or unix:/path")
    p.add_argument("--next", default=None, help="next hop address (default: from the session's route)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size (fractions allowed)")
    p.add_argument("--model-hash", default="")
    p.add_argument("--peer-id", default="")
    p.add_argument("--idle-timeout", type=float, default=120.0)
    p.add_argument("--ready-file", default=None, help="write the bound address here once serving")
    a = p.parse_args(argv)
    from molinkd.engine.watchdog import bind_to_daemon

    bind_to_daemon()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stage %(levelname)s %(message)s")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # --kv-cache-gib is an engine argument (vLLM's legacy variable would override it)

    from molinkd.engine.link import bound_addr, listen

    cfg_args = engine_args_for_stage(
        a.model,
        dtype=a.dtype,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        block_size=a.block_size,
        kv_cache_gib=a.kv_cache_gib,
    )
    vllm_config = cfg_args.create_engine_config()
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()
    span = parse_span(a.layers, num_layers)
    if not isinstance(span, Span) or span.start == 0:
        p.error(f"--layers must be a span not starting at 0 (the head owns layer 0), got {a.layers!r}")
    from molinkd.engine import vllm_patches

    vllm_patches.apply()
    t0 = time.monotonic()
    worker = build_worker(vllm_config, span, num_layers)
    from molinkd.engine import info

    info.report_loaded()
    dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    server = StageServer(
        worker,
        num_layers=num_layers,
        model_hash=a.model_hash,
        dtype=dtype,
        next_addr=a.next,
        peer_id=a.peer_id,
        idle_timeout=a.idle_timeout,
    )
    # the whole KV cache now: the handshake answers fast and no session decides its size
    worker.allocate_kv(worker.max_kv_blocks())
    lsock = listen(a.listen)
    addr = bound_addr(lsock)
    log.info("stage %s ready on %s in %.1fs (max %d KV blocks)", span, addr, time.monotonic() - t0, worker.kv_blocks)
    if a.ready_file:
        tmp = a.ready_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(addr)
        os.replace(tmp, a.ready_file)
    try:
        server.serve_forever(lsock)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
