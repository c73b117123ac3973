"""The local vLLM engine, driven from the daemon's trio loop.

vLLM's ``AsyncLLM`` is asyncio code; the daemon is trio. The engine lives on a private asyncio
loop in one thread; its EngineCore (scheduler + model) runs in its own process, as vLLM does by
default. Each generation is an asyncio task feeding a trio memory channel through the trio token;
cancelling the trio side (client disconnect) cancels the task, and vLLM aborts the request,
freeing its engine slot.

:class:`LocalBackend` turns a validated :class:`~molinkd.protocol.GenerationRequest` into a stream
of plain-dict events (msgpack-able, so the same events can be forwarded to another peer):

- ``{"ev": "start", "prompt": str, "prompt_tokens": int, "n": int, "prompt_token_ids": [...]}``
- ``{"ev": "delta", "index": i, "text": str, "token_ids": [...], "logprobs": [...] | None,
  "finish_reason": str | None}``; logprobs: per token, a list of ``[token_id, logprob, rank,
  decoded]`` with the sampled token first
- ``{"ev": "end", "prompt_tokens": int, "completion_tokens": int}``

Errors surface as :class:`~molinkd.protocol.APIError` raised from the iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator

import trio

from molinkd.protocol import APIError, GenerationRequest

log = logging.getLogger("molinkd.engine")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """vLLM engine options (the subset a MoLink peer exposes as flags)."""

    model: str
    served_name: str
    dtype: str = "auto"
    max_model_len: int | None = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float | None = None
    seed: int = 0
    enforce_eager: bool = True
    block_size: int | None = None
    # Extra engine kwargs (e.g. a pipeline head's executor) and environment for the EngineCore.
    extra_kwargs: tuple[tuple[str, Any], ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()


def _engine_args(opts: EngineOptions):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from molinkd.engine.kvcache import kv_cache_kwargs

    kw: dict[str, Any] = dict(
        model=opts.model,
        served_model_name=opts.served_name,
        dtype=opts.dtype,
        max_model_len=opts.max_model_len,
        max_num_seqs=opts.max_num_seqs,
        seed=opts.seed,
        enforce_eager=opts.enforce_eager,
        disable_log_stats=True,
    )
    if opts.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = opts.max_num_batched_tokens
    kw.update(kv_cache_kwargs(opts.kv_cache_gib, gpu_memory_utilization=opts.gpu_memory_utilization))
    if opts.block_size:
        kw["block_size"] = opts.block_size
    extra = dict(opts.extra_kwargs)
    if "distributed_executor_backend" not in extra:
        from molinkd.engine.local_executor import WatchedUniProcExecutor

        kw["distributed_executor_backend"] = WatchedUniProcExecutor
    kw.update(extra)
    return AsyncEngineArgs(**kw)


def _apply_env(opts: EngineOptions) -> None:
    """Environment read by vLLM when the engine (and its spawned EngineCore) starts."""
    # the KV cache size is an engine argument (molinkd.engine.kvcache); vLLM's legacy variable
    # (whole GiB) would override it, in the EngineCore process too
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # (an empty value breaks vLLM's env cache)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", os.environ.get("MOLINK_VLLM_LOG_LEVEL", "ERROR"))
    # vLLM and torch print FutureWarnings from every process they spawn: quiet by default
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k, v in opts.extra_env:
        os.environ[k] = v


class EngineStopped(RuntimeError):
    """The daemon stopped the engine while requests were in flight."""


class _SafeSender:
    """Send into a trio channel from another thread; silently drops once the receiver is gone."""

    def __init__(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel) -> None:
        self.token = token
        self.send = send

    def __call__(self, item: Any) -> None:
        def _put() -> None:
            try:
                self.send.send_nowait(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        try:
            self.token.run_sync_soon(_put)
        except trio.RunFinishedError:
            pass


class LocalEngine:
    """Owns one AsyncLLM on a private asyncio thread. Start with :meth:`start` (blocking)."""

    def __init__(self, opts: EngineOptions) -> None:
        self.opts = opts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.llm: Any = None
        self.tokenizer: Any = None
        self.max_model_len: int = opts.max_model_len or 0
        self.num_kv_blocks: int | None = None
        self.started_at: float | None = None
        self._pending: set[_SafeSender] = set()  # channels of requests in flight

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Build the engine (blocks ~25 s on CPU). Raises whatever vLLM raised, with context."""
        _apply_env(self.opts)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-asyncio", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._create(), self._loop)
        try:
            fut.result()
        except BaseException:
            self._stop_loop()
            raise
        self.started_at = time.time()

    async def _create(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(_engine_args(self.opts))
        cfg = self.llm.vllm_config
        self.max_model_len = cfg.model_config.max_model_len
        self.num_kv_blocks = getattr(cfg.cache_config, "num_gpu_blocks", None)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.opts.model)

    def shutdown(self) -> None:
        if self.llm is not None and self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(timeout=30)
        self._stop_loop()
        # AsyncLLM.shutdown leaves its requests waiting for outputs that never come: end them
        for put in list(self._pending):
            put(("err", EngineStopped("the engine was stopped (it is being restarted, or the daemon is stopping)")))

    async def _shutdown(self) -> None:
        self.llm.shutdown()
        self.llm = None

    def _stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop = None

    def unfinished(self) -> int:
        """Requests vLLM still holds (waiting or running)."""
        llm = self.llm
        return llm.get_num_unfinished_requests() if llm is not None else 0

    @property
    def alive(self) -> bool:
        return self.llm is not None and not getattr(self.llm, "errored", False)

    # -- generation ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def generate(self, prompt: dict, sampling: Any, request_id: str) -> AsyncIterator[trio.MemoryReceiveChannel]:
        """Yield a channel of vLLM ``RequestOutput`` (DELTA kind); leaving the block aborts the request."""
        if self.llm is None or self._loop is None:
            raise APIError(503, "the engine is not running; check the daemon log", retryable=True)
        send, recv = trio.open_memory_channel(math.inf)
        put = _SafeSender(trio.lowlevel.current_trio_token(), send)
        llm = self.llm

        async def pump() -> None:
            try:
                async for out in llm.generate(prompt, sampling, request_id):
                    put(("out", out))
                put(("end", None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - forwarded to the trio side
                put(("err", e))

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        self._pending.add(put)
        try:
            async with recv:
                yield recv
        finally:
            self._pending.discard(put)
            loop = self._loop
            if not fut.done() and loop is not None:
                loop.call_soon_threadsafe(fut.cancel)
            send.close()


def _logprobs_to_wire(entries: Any, token_ids: Any, k: int) -> list | None:
    """Per generated token: ``[[sampled_id, logprob, rank, text], *top_k sorted by rank]``."""
    if entries is None:
        return None

    def item(tid: int, lp: Any) -> list:
        v = float(lp.logprob)
        return [int(tid), v if math.isfinite(v) else -9999.0, int(lp.rank or 0), lp.decoded_token or ""]

    out = []
    for pos, tid in zip(entries, token_ids):
        chosen = pos.get(tid)
        row = [item(tid, chosen) if chosen is not None else [int(tid), -9999.0, 0, ""]]
        top = sorted(((t, lp) for t, lp in pos.items() if lp.rank is not None and 1 <= lp.rank <= k),
                     key=lambda x: x[1].rank)
        row.extend(item(t, lp) for t, lp in top)
        out.append(row)
    return out


ENGINE_ABORTED = "the engine aborted the request (it is stopping or restarting)"


def delta_event(o: Any, top_logprobs: int) -> dict:
    """The ``delta`` event of one vLLM ``CompletionOutput`` (DELTA kind). A request this backend
    did not abort (a client leaving cancels the stream instead) but that vLLM finished with
    "abort" was cut by the engine stopping: it becomes a retryable error (the tokens of that last
    output are not passed on; the gateway or the resume path continues from the tokens already
    sent, elsewhere), never a finished answer (a soak saw stopping heads hand out truncated ones)."""
    if o.finish_reason == "abort":
        raise APIError(503, ENGINE_ABORTED, retryable=True)
    return {
        "ev": "delta",
        "index": o.index,
        "text": o.text,
        "token_ids": list(o.token_ids),
        "logprobs": _logprobs_to_wire(o.logprobs, o.token_ids, top_logprobs),
        "finish_reason": o.finish_reason,
    }


def check_all_finished(finished: set[int], n: int) -> None:
    """The engine's output stream ended: every choice must have its finish reason by now."""
    if len(finished) < n:
        raise APIError(503, f"the engine's output ended before {n - len(finished)} of {n} choice(s) finished "
                            "(it is stopping or restarting)", retryable=True)


def _client_error() -> type:
    """vLLM's "the request is invalid" exception (not a ValueError in 0.32)."""
    try:
        from vllm.exceptions import VLLMClientError

        return VLLMClientError
    except ImportError:  # pragma: no cover - older vLLM
        return ValueError


class Throughput:
    """Generated tokens per second over a sliding window (for announcements and /status)."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()

    def add(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, n))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], 1.0)
        return sum(n for _, n in self._events) / span


class LocalBackend:
    """Runs GenerationRequests on a :class:`LocalEngine` (this peer is a head or single node)."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.active = 0
        self.total_requests = 0
        self.throughput = Throughput()
        self._tokenizer_lock = trio.CapacityLimiter(1)

    @property
    def model_name(self) -> str:
        return self.engine.opts.served_name

    @property
    def ready(self) -> bool:
        """Whether the engine still runs (a dead one is replaced by the daemon)."""
        return self.engine.alive

    def _render(self, req: GenerationRequest) -> tuple[str, list[int]]:
        tok = self.engine.tokenizer
        if req.kind == "chat":
            try:
                text = tok.apply_chat_template(
                    req.messages, tokenize=False, add_generation_prompt=req.add_generation_prompt
                )
            except Exception as e:  # template errors are the client's (bad roles/order)
                raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return text, list(ids)
        if req.prompt_token_ids is not None:
            vocab = len(tok)
            if any(t >= vocab for t in req.prompt_token_ids):
                raise APIError(400, f"prompt token ids must be < vocabulary size {vocab}", param="prompt")
            return tok.decode(req.prompt_token_ids), list(req.prompt_token_ids)
        assert req.prompt is not None
        return req.prompt, list(tok(req.prompt)["input_ids"])

    def _sampling_params(self, req: GenerationRequest, prompt_len: int):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        limit = self.engine.max_model_len
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len}. "
                "Shorten the prompt.",
                param="prompt",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; you asked for {prompt_len + max_tokens} "
                f"({prompt_len} in the prompt, {max_tokens} to generate). Lower max_tokens.",
                param="max_tokens",
            )
        kw = dict(req.sampling)
        try:
            # a client that does not stream gets one output at the end: no per-step traffic between
            # the engine and this loop (that traffic costs CPU the engine needs at high batch)
            kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
            return SamplingParams(max_tokens=max_tokens, output_kind=kind, **kw)
        except (ValueError, TypeError, _client_error()) as e:
            raise APIError(400, f"invalid sampling parameters: {e}") from None

    async def stream(self, req: GenerationRequest) -> AsyncIterator[dict]:
        """Run one request; yields events (see module docstring). Cancellation aborts it."""
        # off the event loop (long prompts, templates), one at a time (HF fast tokenizers are not
        # safe to call from several threads at once: "Already borrowed")
        prompt_text, ids = await trio.to_thread.run_sync(self._render, req, limiter=self._tokenizer_lock)
        params = self._sampling_params(req, len(ids))
        request_id = req.request_id or uuid.uuid4().hex
        n = params.n
        completion_tokens = 0
        finished: set[int] = set()
        self.active += 1
        self.total_requests += 1
        try:
            yield {"ev": "start", "prompt": prompt_text, "prompt_tokens": len(ids), "n": n, "prompt_token_ids": ids}
            async with self.engine.generate({"prompt_token_ids": ids}, params, request_id) as chan:
                async for kind, val in chan:
                    if kind == "end":
                        break
                    if kind == "err":
                        if isinstance(val, (ValueError, _client_error())):
                            raise APIError(400, str(val))
                        raise APIError(500, f"the engine failed: {type(val).__name__}: {val}",
                                       retryable=True) from val
                    for o in val.outputs:
                        completion_tokens += len(o.token_ids)
                        self.throughput.add(len(o.token_ids))
                        ev = delta_event(o, params.logprobs or 0)
                        if ev["finish_reason"] is not None:
                            finished.add(o.index)
                        yield ev
            check_all_finished(finished, n)
            yield {"ev": "end", "prompt_tokens": len(ids), "completion_tokens": completion_tokens}
        finally:
            self.active -= 1
