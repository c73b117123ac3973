"""Micro-batches for the pipeline head: split the running requests into ``depth`` groups, so that
``depth`` steps are in flight and every stage has work while the others compute or bytes cross
the network.

vLLM keeps ``max_concurrent_batches`` (= the ``pipeline_parallel_size`` it is told) steps in
flight, but its scheduler puts every request that is not already in flight into the next step:
16 requests that start together travel as one batch of 16, and the other queue slots carry empty
steps. :class:`MicroBatchScheduler` caps the decoding requests of one step at
``ceil(running / depth)`` (:func:`micro_batch_cap`); the others wait (hidden from vLLM's loop for
that one call) for the next step. Prefill chunks are never held back, and admission of new requests
still counts the hidden ones. Depth 1 or a single request is plain vLLM scheduling.

Long prompts are cut into ``depth`` chunks (at least ``MIN_PREFILL_CHUNK`` tokens each): vLLM
schedules the next chunk of a prompt while the previous one is still in flight, so the stages
prefill one prompt in a pipeline instead of one after the other (time to first token). vLLM's own
long-prefill threshold never chunks a prompt that runs alone. While other requests decode, chunks
are smaller still: :mod:`molinkd.engine.pacing` sizes them from measured step costs so that
decoding requests keep their pace.

It also spares the wire vLLM's ``all_token_ids`` (each request's whole token history, sent for
every request that was not in the previous step, i.e. every request of every micro-batch): only
asynchronous scheduling reads it on the workers, and the pipeline never schedules asynchronously.
"""

from __future__ import annotations

import math
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from molinkd.engine import pacing


def micro_batch_cap(running: int, depth: int) -> int:
    """Decoding requests allowed in one step: an even share of ``running`` over ``depth`` steps."""
    if depth <= 1 or running <= 1:
        return max(running, 1)
    return math.ceil(running / depth)


MIN_PREFILL_CHUNK = 64


def prefill_chunk(prompt_tokens: int, depth: int) -> int:
    """Tokens of a prompt to prefill per step: the whole prompt when it is short, else an even
    share over ``depth`` steps (never below ``MIN_PREFILL_CHUNK``)."""
    if depth <= 1 or prompt_tokens <= 2 * MIN_PREFILL_CHUNK:
        return prompt_tokens
    return max(MIN_PREFILL_CHUNK, math.ceil(prompt_tokens / depth))


def step_token_budget(budget: int, decodes: int, prefills: list[tuple[int, int]], depth: int,
                      paced: int | None = None) -> int:
    """Token budget of one step: the decodes it runs, plus one chunk of every prompt still to
    prefill (``(prompt tokens, tokens left)`` pairs), at most ``budget``. ``paced``: the prompt
    tokens one step may carry while requests decode (:mod:`molinkd.engine.pacing`), shared by the
    prompts of the step."""
    if not prefills:
        return budget
    whole = chunks = 0  # short prompts go whole; only prompts that are cut anyway are paced
    for prompt, left in prefills:
        chunk = prefill_chunk(prompt, depth)
        if chunk >= prompt:
            whole += left
        else:
            chunks += min(left, chunk)
    if paced is not None:
        chunks = min(chunks, paced)
    return max(1, min(budget, decodes + whole + chunks))


def split_ready(ready: list[bool], decoding: list[bool], cap: int) -> list[int]:
    """Indexes (into the running list) to hold back this step: ready decoding requests beyond the
    first ``cap`` ready decoding ones. Requests in flight (not ready) and prefills are never held."""
    held, kept = [], 0
    for i, (r, d) in enumerate(zip(ready, decoding)):
        if not (r and d):
            continue
        if kept < cap:
            kept += 1
        else:
            held.append(i)
    return held


class MicroBatchScheduler(Scheduler):
    """vLLM's scheduler, with steps of at most ``ceil(running / depth)`` decoding requests, where
    ``depth`` is the pipeline depth the head told vLLM (``pipeline_parallel_size``)."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.depth = int(vllm_config.max_concurrent_batches)
        self._chunking = bool(self.scheduler_config.enable_chunked_prefill) and self.depth > 1
        self._token_history_unused = not (self.scheduler_config.async_scheduling or self.use_v2_model_runner)

    def schedule(self, throttle_prefills: bool = False) -> Any:
        if self._token_history_unused:
            # every running request counts as "scheduled last step": no all_token_ids on the wire
            self.prev_step_scheduled_req_ids.update(r.request_id for r in self.running)
        running = self.running
        cap = micro_batch_cap(len(running), self.depth)
        ready = [r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens > 0 for r in running]
        decoding = [r.num_computed_tokens >= r.num_prompt_tokens for r in running]
        held_idx = split_ready(ready, decoding, cap)
        budget = self.max_num_scheduled_tokens
        if self._chunking:
            prefills = [(r.num_prompt_tokens, r.num_prompt_tokens - r.num_computed_tokens)
                        for r, rd, d in zip(running, ready, decoding) if rd and not d]
            # waiting requests include preempted ones, which recompute their outputs too
            prefills += [(r.num_tokens, r.num_tokens - r.num_computed_tokens) for r in self.waiting]
            kept = sum(1 for rd, d in zip(ready, decoding) if rd and d) - len(held_idx)
            # requests decoding (in this step, held, or in flight) pace the prompts' chunks
            paced = pacing.shared.chunk() if any(decoding) else None
            budget = step_token_budget(budget, kept, prefills, self.depth, paced)
            # (a seeded request's prompt is cut too: the last stage's vLLM rewinds its generator
            # after a partial prefill, on CPU with molinkd.engine.vllm_patches.cpu_generator_rewind)
        if not held_idx and budget == self.max_num_scheduled_tokens:
            return super().schedule(throttle_prefills)
        held = [running[i] for i in held_idx]
        held_ids = {id(r) for r in held}
        saved = (self.max_num_running_reqs, self.max_num_active_reqs, self.max_num_scheduled_tokens)
        self.running = [r for r in running if id(r) not in held_ids]
        # the held requests still occupy their slots: admission must count them
        self.max_num_running_reqs -= len(held)
        self.max_num_active_reqs -= len(held)
        self.max_num_scheduled_tokens = budget
        try:
            return super().schedule(throttle_prefills)
        finally:
            self.max_num_running_reqs, self.max_num_active_reqs, self.max_num_scheduled_tokens = saved
            after = self.running  # minus preempted requests, plus admitted ones
            after_ids = {id(r) for r in after}
            before_ids = {id(r) for r in running}
            self.running = [r for r in running if id(r) in held_ids or id(r) in after_ids] + [
                r for r in after if id(r) not in before_ids]
