"""What the pipeline's remote stages know, kept by the head so it can rebuild them (no I/O).

The head's executor sees every SchedulerOutput it sends and every ModelRunnerOutput that comes
back. :class:`RequestMirror` replays them into the state the remote stages' model runners hold
after the last step whose result arrived ("committed"): every live request's prompt, sampling
parameters, KV block ids, how many tokens of it have KV computed, and the tokens sampled so far.
Steps sent after that one are "in flight"; the executor keeps their frames.

When the tail of the route is lost, :func:`rebuild_plan` turns the mirror into synthetic steps for
a fresh tail (and the matching steps the head's own stage-0 worker must run to produce hidden
states for them), so that afterwards the new tail's model runner is in the same state as the old
one was after the committed step, *including the order of its persistent batch*: hidden states
travel as rows in that order, and each runner derives its order from its previous order and the
step. The in-flight steps can then be re-sent verbatim.

How the state is reproduced (vLLM 0.32 ``GPUModelRunner._update_states``, used by the CPU runner):

- each live request is presented to the tail as a *new* request whose prompt is every token known
  so far (prompt + sampled), with its real block ids, and its computed tokens are scheduled
  (chunked to the token/sequence budgets): KV for exactly the positions the old tail had. Its
  sampled token count as prompt keeps ``num_tokens`` right, so the last stage discards the
  tokens it samples during the rebuild (they are partial prefills) and samples normally after;
- the requests that were in the runner's batch after the committed step (``order``, recorded by
  the head) are prefilled up to their last computed position, then an empty step clears the batch
  and a last step schedules their last computed position, one token each, in ``order``: vLLM adds
  requests that are not in the batch in that order, so the batch ends up exactly ``order``;
- the head computes the same chunks for temporary request ids (same block ids: it rewrites its own
  KV with the values it already holds), then a restore step finishes the temporaries and puts its
  real requests back in its batch in their order (recomputing each one's last KV position).

This relies on the attention backend not reordering the batch (``reorder_batch_threshold`` None:
the CPU backend and FlashAttention; the executor checks). Limits (:class:`NotRebuildable` says which): no preempted requests, no multimodal inputs, prompt
embeddings, LoRA or speculative decoding. Sampled tokens become part of the rebuilt prompt on the
last stage, so output-dependent sampling state is not carried over: presence/frequency penalties
and ``min_tokens`` count only tokens sampled after the failover, and a seeded generator restarts
from its seed (as for requests resumed on another engine; greedy and unseeded sampling are exact).
"""

from __future__ import annotations

import dataclasses
from typing import Any

TEMP_PREFIX = "molink-rebuild-"


class NotRebuildable(RuntimeError):
    """The mirror cannot reproduce the remote state (the message says why)."""


class MirrorError(RuntimeError):
    """A step did not fit the mirror's state (a request it does not know): a bug, not a peer fault."""


@dataclasses.dataclass
class MirroredRequest:
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: Any
    block_ids: tuple[list[int], ...]
    computed: int  # tokens whose KV the stages hold
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    preempted: bool = False
    unsupported: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


def _copy_blocks(block_ids: Any) -> tuple[list[int], ...]:
    return tuple(list(g) for g in block_ids)


class RequestMirror:
    """The remote stages' request state after the last committed step (see module docstring)."""

    def __init__(self) -> None:
        self.requests: dict[str, MirroredRequest] = {}
        self.order: list[str] = []  # the runners' persistent batch after the committed step

    def apply_step(self, so: Any, order: list[str] | None = None) -> None:
        """Apply one SchedulerOutput as the stages' runners do; ``order`` is the head runner's batch
        order after it executed this step (the stages end up with the same)."""
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
        for rid in so.preempted_req_ids or ():
            r = self.requests.get(rid)
            if r is not None:
                r.preempted = True
        sched = so.num_scheduled_tokens
        for nr in so.scheduled_new_reqs:
            why = None
            if nr.prompt_token_ids is None or nr.prompt_embeds is not None:
                why = "prompt embeddings"
            elif nr.mm_features:
                why = "multimodal inputs"
            elif nr.lora_request is not None:
                why = "a LoRA adapter"
            self.requests[nr.req_id] = MirroredRequest(
                req_id=nr.req_id, prompt_token_ids=list(nr.prompt_token_ids or []),
                sampling_params=nr.sampling_params, block_ids=_copy_blocks(nr.block_ids),
                computed=nr.num_computed_tokens + sched.get(nr.req_id, 0), unsupported=why)
        c = so.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            r = self.requests.get(rid)
            if r is None:
                raise MirrorError(f"step schedules request {rid!r} the mirror does not know")
            new = c.new_block_ids[i]
            if rid in c.resumed_req_ids:
                r.block_ids = _copy_blocks(new or ())
                r.preempted = False
            elif new is not None:
                for mine, add in zip(r.block_ids, new):
                    mine.extend(add)
            r.computed = c.num_computed_tokens[i] + sched.get(rid, 0)
        if so.scheduled_spec_decode_tokens:
            for rid in so.scheduled_spec_decode_tokens:
                if rid in self.requests:
                    self.requests[rid].unsupported = "speculative decoding"
        if order is not None:
            self.order = [rid for rid in order if rid in self.requests]

    def apply_result(self, out: Any) -> None:
        """Add the tokens the last stage sampled in a committed step."""
        for rid, toks in zip(out.req_ids, out.sampled_token_ids):
            r = self.requests.get(rid)
            if r is not None and len(toks):
                r.output_token_ids.extend(int(t) for t in toks)


@dataclasses.dataclass
class RebuildStep:
    """One synthetic step: ``tail`` goes to the new stages (with the hidden states the head's
    worker computes for ``head``); ``head`` alone is a head-only step (no hidden states sent)."""

    head: Any
    tail: Any | None


def _so(new: list, cached: Any, sched: dict[str, int], finished: set[str] | None = None) -> Any:
    from vllm.v1.core.sched.output import SchedulerOutput

    return SchedulerOutput(
        scheduled_new_reqs=new, scheduled_cached_reqs=cached, num_scheduled_tokens=sched,
        total_num_scheduled_tokens=sum(sched.values()), scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids=set(finished or ()), free_encoder_mm_hashes=[])


def _cached(items: list[tuple[str, int, list[int]]]) -> Any:
    """CachedRequestData for ``(req_id, num_computed_tokens, scheduled token ids)``: no new blocks.
    With pipeline parallelism vLLM sends the scheduled tokens as ``new_token_ids``; a runner only
    appends those beyond the tokens it knows (none here)."""
    from vllm.v1.core.sched.output import CachedRequestData

    return CachedRequestData(
        req_ids=[i[0] for i in items], resumed_req_ids=set(), new_token_ids=[list(i[2]) for i in items],
        all_token_ids={}, new_block_ids=[None for _ in items], num_computed_tokens=[i[1] for i in items],
        num_output_tokens=[0 for _ in items])


NULL_BLOCK = 0  # vLLM's BlockPool reserves block 0 (its null block): never given to a request


def _new(rid: str, r: MirroredRequest, prompt: list[int], *, scratch: bool = False) -> Any:
    """A new request for ``r``; ``scratch`` puts every block of it on the null block (its KV
    values are thrown away: see ``gone`` in :func:`rebuild_plan`)."""
    from vllm.v1.core.sched.output import NewRequestData

    sp = r.sampling_params
    if sp is not None and sp.prompt_logprobs is not None:
        # delivered during the real prefill (rebuild_plan refuses requests still in it): the
        # rebuilt prompt must not produce them again
        sp = sp.clone()
        sp.prompt_logprobs = None
    return NewRequestData(req_id=rid, prompt_token_ids=list(prompt), mm_features=[],
                          sampling_params=sp, pooling_params=None,
                          block_ids=tuple([NULL_BLOCK] * len(g) for g in r.block_ids) if scratch
                          else _copy_blocks(r.block_ids), num_computed_tokens=0, lora_request=None)


def rebuild_plan(mirror: RequestMirror, *, max_tokens: int, max_seqs: int,
                 head_order: list[str], head_computed: dict[str, tuple[int, int]],
                 gone: set[str] | frozenset[str] = frozenset()) -> list[RebuildStep]:
    """Synthetic steps that rebuild a fresh tail to the mirror's state, then restore the head's
    own batch to ``head_order`` (its runner's batch now; ``head_computed[req]`` = (tokens of KV it
    holds, the token id at the last of those positions)). Raises :class:`NotRebuildable`.

    ``gone``: requests a step in flight finishes or preempts. The head's scheduler has already
    freed their blocks and may have given them to a request of a later step, whose KV the head's
    worker already wrote: computing a gone request's temporary in its old blocks would overwrite
    that KV (seen in a soak: a request admitted just before a failover went on with another
    request's keys and values from its fourth token). The tail still needs gone requests (its
    batch order must be the old one when the re-sent steps finish or preempt them), but never
    their values: their head temporaries run on the null block."""
    if max_tokens < 1 or max_seqs < 1:
        raise ValueError("budgets must be positive")
    reqs = mirror.requests
    for r in reqs.values():
        if r.preempted:
            raise NotRebuildable(f"request {r.req_id} is preempted (its KV is gone)")
        if r.unsupported:
            raise NotRebuildable(f"request {r.req_id} uses {r.unsupported}")
        if r.sampling_params is not None and r.sampling_params.prompt_logprobs is not None \
                and r.computed < len(r.prompt_token_ids):
            raise NotRebuildable(f"request {r.req_id} wants prompt logprobs and is still in its prefill")
        if not 0 <= r.computed < len(r.tokens):
            # computed == known would make the last stage sample during the rebuild
            raise NotRebuildable(f"request {r.req_id}: {r.computed} computed tokens, {len(r.tokens)} known")
    in_batch = [rid for rid in mirror.order if rid in reqs]
    last = set(in_batch)
    for rid in in_batch:
        if reqs[rid].computed < 2:
            raise NotRebuildable(f"request {rid} has {reqs[rid].computed} computed token(s): "
                                 "its batch position cannot be restored")
    for rid in head_order:
        if head_computed.get(rid, (0, 0))[0] < 1:
            raise NotRebuildable(f"request {rid} is in the head's batch with nothing computed")

    def temp(rid: str) -> str:
        return TEMP_PREFIX + rid

    def last_of(rid: str) -> tuple[int, list[int]]:
        c = reqs[rid].computed
        return c - 1, reqs[rid].tokens[c - 1:c]

    # 1. prefill: each request's computed tokens (all but the last for the ordered ones)
    work = [(rid, r.computed - (1 if rid in last else 0)) for rid, r in reqs.items()]
    work = [(rid, n) for rid, n in work if n > 0]
    steps: list[RebuildStep] = []
    pending: list[tuple[str, int]] = []  # whole requests packed into one step

    def flush() -> None:
        if not pending:
            return
        tail_new = [_new(rid, reqs[rid], reqs[rid].tokens) for rid, _ in pending]
        head_new = [_new(temp(rid), reqs[rid], reqs[rid].tokens[:reqs[rid].computed], scratch=rid in gone)
                    for rid, _ in pending]
        steps.append(RebuildStep(
            head=_so(head_new, _cached([]), {temp(rid): n for rid, n in pending}),
            tail=_so(tail_new, _cached([]), {rid: n for rid, n in pending})))
        pending.clear()

    used = 0
    for rid, n in work:
        if n > max_tokens:  # alone, in chunks: the first as a new request, the rest cached
            flush()
            used = 0
            r = reqs[rid]
            done = 0
            while done < n:
                k = min(max_tokens, n - done)
                if done == 0:
                    head = _so([_new(temp(rid), r, r.tokens[:r.computed], scratch=rid in gone)], _cached([]),
                               {temp(rid): k})
                    tail = _so([_new(rid, r, r.tokens)], _cached([]), {rid: k})
                else:
                    toks = r.tokens[done:done + k]
                    head = _so([], _cached([(temp(rid), done, toks)]), {temp(rid): k})
                    tail = _so([], _cached([(rid, done, toks)]), {rid: k})
                steps.append(RebuildStep(head=head, tail=tail))
                done += k
            continue
        if used + n > max_tokens or len(pending) >= max_seqs:
            flush()
            used = 0
        pending.append((rid, n))
        used += n
    flush()
    # 2. the batch the stages had after the committed step, in its order
    if in_batch:
        steps.append(RebuildStep(head=_so([], _cached([]), {}), tail=_so([], _cached([]), {})))
        if len(in_batch) > max_seqs:
            raise NotRebuildable(f"{len(in_batch)} requests in the batch exceed max_num_seqs {max_seqs}")
        steps.append(RebuildStep(
            head=_so([], _cached([(temp(rid), *last_of(rid)) for rid in in_batch]), {temp(rid): 1 for rid in in_batch}),
            tail=_so([], _cached([(rid, *last_of(rid)) for rid in in_batch]), {rid: 1 for rid in in_batch})))
    # 3. the head: drop the temporaries, put its own batch back (head-only step)
    temps = {temp(rid) for rid in reqs}
    restore = _so([], _cached([(rid, head_computed[rid][0] - 1, [head_computed[rid][1]]) for rid in head_order]),
                  {rid: 1 for rid in head_order}, finished=temps)
    steps.append(RebuildStep(head=restore, tail=None))
    return steps
