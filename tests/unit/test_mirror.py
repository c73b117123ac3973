"""The head's mirror of the remote stages' request state, and the rebuild steps made from it."""

from __future__ import annotations

import pytest

from molinkd.engine.mirror import TEMP_PREFIX, MirrorError, NotRebuildable, RequestMirror, rebuild_plan
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput


def new_req(rid, prompt, blocks, computed=0):
    return NewRequestData(req_id=rid, prompt_token_ids=list(prompt), mm_features=[],
                          sampling_params=SamplingParams(temperature=0.0, max_tokens=8), pooling_params=None,
                          block_ids=(list(blocks),), num_computed_tokens=computed, lora_request=None)


def cached(items, resumed=()):
    """items: (rid, num_computed_tokens, new_blocks or None, new_token_ids)"""
    return CachedRequestData(req_ids=[i[0] for i in items], resumed_req_ids=set(resumed),
                             new_token_ids=[list(i[3]) for i in items], all_token_ids={},
                             new_block_ids=[None if i[2] is None else (list(i[2]),) for i in items],
                             num_computed_tokens=[i[1] for i in items], num_output_tokens=[0 for _ in items])


def step(new=(), cached_reqs=None, sched=None, finished=()):
    sched = dict(sched or {})
    return SchedulerOutput(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached_reqs or CachedRequestData.make_empty(),
                           num_scheduled_tokens=sched, total_num_scheduled_tokens=sum(sched.values()),
                           scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                           finished_req_ids=set(finished), free_encoder_mm_hashes=[])


def result(pairs):
    return ModelRunnerOutput(req_ids=[p[0] for p in pairs], req_id_to_index={p[0]: i for i, p in enumerate(pairs)},
                             sampled_token_ids=[list(p[1]) for p in pairs])


def two_decoding() -> RequestMirror:
    """a: prompt 5 tokens (blocks 0,1), b: prompt 3 tokens (block 2); both decoded twice."""
    m = RequestMirror()
    m.apply_step(step([new_req("a", [1, 2, 3, 4, 5], [0, 1]), new_req("b", [7, 8, 9], [2])],
                      sched={"a": 5, "b": 3}), order=["a", "b"])
    m.apply_result(result([("a", [10]), ("b", [20])]))
    m.apply_step(step(cached_reqs=cached([("a", 5, None, [10]), ("b", 3, [3], [20])]), sched={"a": 1, "b": 1}),
                 order=["b", "a"])
    m.apply_result(result([("a", [11]), ("b", [21])]))
    return m


def test_mirror_follows_new_cached_results_and_finished():
    m = two_decoding()
    a, b = m.requests["a"], m.requests["b"]
    assert a.tokens == [1, 2, 3, 4, 5, 10, 11] and a.computed == 6 and a.block_ids == ([0, 1],)
    assert b.tokens == [7, 8, 9, 20, 21] and b.computed == 4 and b.block_ids == ([2, 3],)
    assert m.order == ["b", "a"]
    m.apply_step(step(cached_reqs=cached([("a", 6, None, [11])]), sched={"a": 1}, finished={"b"}), order=["a"])
    assert set(m.requests) == {"a"} and m.order == ["a"]


def test_partial_prefill_adds_no_token_and_resume_replaces_blocks():
    m = RequestMirror()
    m.apply_step(step([new_req("a", range(10), [0])], sched={"a": 4}), order=["a"])
    m.apply_result(result([("a", [])]))
    assert m.requests["a"].computed == 4 and m.requests["a"].output_token_ids == []
    m.apply_step(step(cached_reqs=cached([("a", 0, [5, 6], [])], resumed={"a"}), sched={"a": 2}))
    assert m.requests["a"].block_ids == ([5, 6],) and m.requests["a"].computed == 2


def test_unknown_request_is_a_mirror_error():
    with pytest.raises(MirrorError):
        RequestMirror().apply_step(step(cached_reqs=cached([("x", 3, None, [])]), sched={"x": 1}))


def test_rebuild_plan_reproduces_state_and_batch_order():
    m = two_decoding()
    steps = rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=["b", "a"], head_computed={"a": (7, 12), "b": (5, 22)})
    # prefill (all but the last computed position of each batched request), clear, ordered, head restore
    assert len(steps) == 4
    pre = steps[0].tail
    assert [r.req_id for r in pre.scheduled_new_reqs] == ["a", "b"]
    assert pre.num_scheduled_tokens == {"a": 5, "b": 3}
    ra = pre.scheduled_new_reqs[0]
    assert ra.prompt_token_ids == [1, 2, 3, 4, 5, 10, 11] and ra.block_ids == ([0, 1],) and ra.num_computed_tokens == 0
    hp = steps[0].head
    assert [r.req_id for r in hp.scheduled_new_reqs] == [TEMP_PREFIX + "a", TEMP_PREFIX + "b"]
    assert hp.scheduled_new_reqs[0].prompt_token_ids == [1, 2, 3, 4, 5, 10]  # computed tokens only
    assert steps[1].tail.total_num_scheduled_tokens == 0 and steps[1].head.total_num_scheduled_tokens == 0
    fin = steps[2].tail.scheduled_cached_reqs
    assert fin.req_ids == ["b", "a"] and fin.num_computed_tokens == [3, 5]
    assert steps[2].tail.num_scheduled_tokens == {"b": 1, "a": 1}
    assert steps[2].head.scheduled_cached_reqs.req_ids == [TEMP_PREFIX + "b", TEMP_PREFIX + "a"]
    restore = steps[3]
    assert restore.tail is None
    assert restore.head.finished_req_ids == {TEMP_PREFIX + "a", TEMP_PREFIX + "b"}
    assert restore.head.scheduled_cached_reqs.req_ids == ["b", "a"]
    assert restore.head.scheduled_cached_reqs.num_computed_tokens == [4, 6]
    assert restore.head.scheduled_cached_reqs.new_token_ids == [[22], [12]]
    assert fin.new_token_ids == [[20], [10]]  # the token at each one's last computed position
    # every tail step's rows match the head step's rows one for one
    for s in steps[:3]:
        assert sorted(s.head.num_scheduled_tokens.values()) == sorted(s.tail.num_scheduled_tokens.values())


def test_rebuild_plan_respects_budgets_and_chunks_long_requests():
    m = RequestMirror()
    m.apply_step(step([new_req(f"r{i}", range(30), [i]) for i in range(5)], sched={f"r{i}": 30 for i in range(5)}),
                 order=["r3", "r1"])
    m.apply_result(result([(f"r{i}", [99]) for i in range(5)]))
    steps = rebuild_plan(m, max_tokens=40, max_seqs=2, head_order=[], head_computed={})
    prefill = [s for s in steps if s.tail is not None and s.tail.scheduled_new_reqs]
    assert all(s.tail.total_num_scheduled_tokens <= 40 and len(s.tail.num_scheduled_tokens) <= 2 for s in steps if s.tail)
    assert sum(s.tail.total_num_scheduled_tokens for s in prefill) == 5 * 30 - 2
    assert steps[-2].tail.scheduled_cached_reqs.req_ids == ["r3", "r1"]
    long = RequestMirror()
    long.apply_step(step([new_req("x", range(100), [0, 1, 2, 3, 4, 5, 6])], sched={"x": 100}))
    long.apply_result(result([("x", [5])]))
    steps = rebuild_plan(long, max_tokens=40, max_seqs=4, head_order=[], head_computed={})
    chunks = [s.tail for s in steps if s.tail is not None]
    assert [c.total_num_scheduled_tokens for c in chunks] == [40, 40, 20]
    assert chunks[1].scheduled_cached_reqs.num_computed_tokens == [40]
    assert chunks[2].scheduled_cached_reqs.num_computed_tokens == [80]
    assert chunks[2].scheduled_cached_reqs.new_token_ids == [list(range(80, 100))]


def test_not_rebuildable_cases():
    m = two_decoding()
    m.requests["a"].preempted = True
    with pytest.raises(NotRebuildable, match="preempted"):
        rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=[], head_computed={})
    m = two_decoding()
    m.requests["b"].computed = len(m.requests["b"].tokens)
    with pytest.raises(NotRebuildable, match="computed"):
        rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=[], head_computed={})


def test_empty_mirror_only_restores_the_head():
    steps = rebuild_plan(RequestMirror(), max_tokens=8, max_seqs=2, head_order=["z"], head_computed={"z": (3, 4)})
    assert len(steps) == 1 and steps[0].tail is None
    assert steps[0].head.scheduled_cached_reqs.req_ids == ["z"]


def test_rebuild_steps_pass_the_stage_checks():
    """Every synthetic tail step is a valid SchedulerOutput for the session's limits."""
    from molinkd.engine import schedwire
    from molinkd.limits import SessionLimits

    lim = SessionLimits(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
                        max_model_len=256, vocab_size=1000, hidden_size=8, dtype="float32")
    m = two_decoding()
    for s in rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=["b", "a"], head_computed={"a": (7, 12), "b": (5, 22)}):
        for so in (s.head, s.tail):
            if so is not None:
                wire = schedwire.decode_scheduler_output(schedwire.encode_scheduler_output(so))
                schedwire.check_scheduler_output(wire, lim)


def test_prompt_logprobs_are_not_produced_again():
    m = two_decoding()
    m.requests["a"].sampling_params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=2)
    steps = rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=[], head_computed={})
    (ra,) = [r for r in steps[0].tail.scheduled_new_reqs if r.req_id == "a"]
    assert ra.sampling_params.prompt_logprobs is None
    assert m.requests["a"].sampling_params.prompt_logprobs == 2  # the mirror's own copy is untouched
    m.requests["a"].computed = 3  # still in its prompt
    m.requests["a"].output_token_ids = []
    with pytest.raises(NotRebuildable, match="prompt logprobs"):
        rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=[], head_computed={})


def test_requests_gone_in_flight_never_touch_blocks_the_head_gave_away():
    """b finished in a step still in flight: the head's scheduler freed its blocks (2, 3) and may
    have handed them to a request of that step, whose KV the head already wrote. The tail still
    gets b in its real blocks (its batch order needs b until the re-sent step finishes it), but the
    head computes b's temporary on the null block only; a (live) keeps its own blocks everywhere."""
    from molinkd.engine.mirror import NULL_BLOCK

    m = two_decoding()
    steps = rebuild_plan(m, max_tokens=64, max_seqs=8, head_order=["a"], head_computed={"a": (7, 12)}, gone={"b"})
    head_blocks = {r.req_id: r.block_ids for s in steps for r in s.head.scheduled_new_reqs}
    tail_blocks = {r.req_id: r.block_ids for s in steps if s.tail is not None for r in s.tail.scheduled_new_reqs}
    assert head_blocks[TEMP_PREFIX + "b"] == ([NULL_BLOCK, NULL_BLOCK],)
    assert head_blocks[TEMP_PREFIX + "a"] == ([0, 1],)  # a's real blocks (rewritten with the same values)
    assert tail_blocks == {"a": ([0, 1],), "b": ([2, 3],)}
    # the chunked path (a request longer than the token budget) obeys it too
    long = RequestMirror()
    long.apply_step(step([new_req("x", range(90), [4, 5])], sched={"x": 90}), order=["x"])
    long.apply_result(result([("x", [99])]))
    steps = rebuild_plan(long, max_tokens=40, max_seqs=4, head_order=[], head_computed={}, gone={"x"})
    firsts = [r for s in steps for r in s.head.scheduled_new_reqs]
    assert [r.block_ids for r in firsts] == [([NULL_BLOCK, NULL_BLOCK],)]
    assert [r.block_ids for s in steps if s.tail is not None for r in s.tail.scheduled_new_reqs] == [([4, 5],)]
