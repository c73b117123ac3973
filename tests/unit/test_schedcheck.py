"""Scheduler outputs, hidden states and model-runner outputs checked against a session's limits:
honest messages pass, every out-of-range or inconsistent value is refused naming its field."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from molinkd.engine import schedwire
from molinkd.engine.schedwire import (
    WireError,
    check_hidden_states,
    check_model_runner_output,
    check_sampling_params,
    check_scheduler_output,
)
from molinkd.limits import SessionLimits
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput

LIM = SessionLimits(num_blocks=40, block_size=16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
                    vocab_size=100, hidden_size=8, dtype="bfloat16", max_logprobs=5)


def sp(**kw) -> SamplingParams:
    p = SamplingParams(**{"max_tokens": 16, **kw})
    p.update_from_generation_config({}, eos_token_id=2)
    return p


def new_req(rid: str, prompt: list[int], blocks: list[int], **kw) -> NewRequestData:
    base = dict(req_id=rid, prompt_token_ids=prompt, mm_features=[], sampling_params=sp(), pooling_params=None,
                block_ids=(blocks,), num_computed_tokens=0, lora_request=None)
    base.update(kw)
    return NewRequestData(**base)


def prefill() -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=[new_req("a", [5, 6, 7, 8], [0]), new_req("b", list(range(20)), [1, 2])],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={"a": 4, "b": 20},
        total_num_scheduled_tokens=24,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
        new_block_ids_to_zero=[0, 1, 2],
        num_common_prefix_blocks=[0],
    )


def decode() -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData(
            req_ids=["a", "b"], resumed_req_ids={"b"}, new_token_ids=[[11], [12]],
            all_token_ids={"b": list(range(21))}, new_block_ids=[None, ([3],)],
            num_computed_tokens=[4, 20], num_output_tokens=[1, 1],
        ),
        num_scheduled_tokens={"a": 1, "b": 1},
        total_num_scheduled_tokens=2,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids={"z"},
        free_encoder_mm_hashes=[],
        kv_cache_block_copies=[KVCacheBlockCopy(1, 4)],
    )


def wire_round_trip(so: SchedulerOutput) -> SchedulerOutput:
    return schedwire.decode_scheduler_output(schedwire.encode_scheduler_output(so))


@pytest.mark.parametrize("make", [prefill, decode, SchedulerOutput.make_empty])
def test_honest_steps_pass(make):
    check_scheduler_output(make(), LIM)
    check_scheduler_output(wire_round_trip(make()), LIM)


def _set(path: str, value):
    def mutate(so: SchedulerOutput) -> None:
        obj = so
        *head, last = path.split(".")
        for part in head:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        if last.isdigit():
            obj[int(last)] = value
        else:
            setattr(obj, last, value)
    return mutate


PREFILL_ATTACKS = [
    ("block id past the cache", _set("scheduled_new_reqs.0.block_ids", ([40],)), r"block ids\) holds 40"),
    ("negative block id", _set("scheduled_new_reqs.0.block_ids", ([-1],)), "holds -1"),
    ("two block groups", _set("scheduled_new_reqs.0.block_ids", ([0], [1])), "2 block groups"),
    ("too many blocks for one request", _set("scheduled_new_reqs.0.block_ids", (list(range(9)),)), "at most 8"),
    ("token id past the vocabulary", _set("scheduled_new_reqs.0.prompt_token_ids", [5, 6, 7, 100]), "prompt_token_ids holds 100"),
    ("negative token id", _set("scheduled_new_reqs.0.prompt_token_ids", [5, 6, -3, 8]), "holds -3"),
    ("prompt longer than the context", _set("scheduled_new_reqs.1.prompt_token_ids", [1] * 129), "length"),
    ("computed past max_model_len", _set("scheduled_new_reqs.0.num_computed_tokens", 126), "exceed max_model_len"),
    ("negative computed", _set("scheduled_new_reqs.0.num_computed_tokens", -1), "num_computed_tokens is -1"),
    ("zero-block list to zero past the cache", _set("new_block_ids_to_zero", [0, 99]), "new_block_ids_to_zero holds 99"),
    ("too many tokens", lambda so: (so.num_scheduled_tokens.update(b=61), setattr(so, "total_num_scheduled_tokens", 65)), "total_num_scheduled_tokens is 65"),
    ("total lies", _set("total_num_scheduled_tokens", 23), "sum"),
    ("negative count", lambda so: (so.num_scheduled_tokens.update(a=-4, b=28), None), "negative"),
    ("count for a request not in the step", lambda so: so.num_scheduled_tokens.update(ghost=0), "disagree"),
    ("request without a count", lambda so: so.num_scheduled_tokens.pop("a") and setattr(so, "total_num_scheduled_tokens", 20), "disagree"),
    ("same request twice", lambda so: so.scheduled_new_reqs.append(new_req("a", [1], [5])), "twice"),
    ("too many requests", lambda so: [so.scheduled_new_reqs.append(new_req(f"x{i}", [1], [5])) or so.num_scheduled_tokens.update({f"x{i}": 0}) for i in range(3)], "allows 4"),
    ("spec tokens without spec decoding", lambda so: so.scheduled_spec_decode_tokens.update(b=[1]), "scheduled_spec_decode_tokens"),
    ("spec budget lies", _set("num_spec_tokens_to_schedule", 3), "num_spec_tokens_to_schedule"),
    ("encoder inputs", lambda so: so.scheduled_encoder_inputs.update(a=[0]), "encoder"),
    ("copy to a block past the cache", _set("kv_cache_block_copies", [KVCacheBlockCopy(0, 40)]), "0->40"),
    ("common prefix blocks past a request", _set("num_common_prefix_blocks", [9]), "num_common_prefix_blocks"),
    ("logprobs over the limit", _set("scheduled_new_reqs.0.sampling_params", sp(logprobs=6)), "logprobs is 6"),
    ("prompt logprobs over the limit", _set("scheduled_new_reqs.0.sampling_params", sp(prompt_logprobs=50)), "prompt_logprobs"),
    ("stop token outside the vocabulary", _set("scheduled_new_reqs.0.sampling_params", sp(stop_token_ids=[1000])), "stop_token_ids"),
    ("allowed token outside the vocabulary", _set("scheduled_new_reqs.0.sampling_params", sp(allowed_token_ids=[3, 100])), "allowed_token_ids"),
    ("logit bias outside the vocabulary", _set("scheduled_new_reqs.0.sampling_params", sp(logit_bias={500: 1.0})), "logit_bias"),
    ("max_tokens past the context", _set("scheduled_new_reqs.0.sampling_params", sp(max_tokens=10_000)), "max_tokens"),
    ("no sampling params", _set("scheduled_new_reqs.0.sampling_params", None), "sampling_params"),
    ("prompt_is_token_ids of another length", _set("scheduled_new_reqs.0.prompt_is_token_ids", [True]), "prompt_is_token_ids"),
    ("huge request id", lambda so: (so.scheduled_new_reqs.__setitem__(0, new_req("a" * 600, [5, 6, 7, 8], [0])), so.num_scheduled_tokens.update({"a" * 600: so.num_scheduled_tokens.pop("a")})), "characters"),
]

DECODE_ATTACKS = [
    ("new block past the cache", _set("scheduled_cached_reqs.new_block_ids", [None, ([41],)]), "new_block_ids\\[1\\]\\[0\\] \\(block ids\\) holds 41"),
    ("new tokens outside the vocabulary", _set("scheduled_cached_reqs.new_token_ids", [[11], [100]]), "new_token_ids\\[1\\] holds 100"),
    ("new tokens not matching the count", _set("scheduled_cached_reqs.new_token_ids", [[11], [12, 13]]), "2 tokens, 1 are scheduled"),
    ("resumed tokens outside the vocabulary", _set("scheduled_cached_reqs.all_token_ids", {"b": [1, 2, 300]}), "all_token_ids"),
    ("resumed request not cached", _set("scheduled_cached_reqs.resumed_req_ids", {"zz"}), "resumed_req_ids"),
    ("position past the context", _set("scheduled_cached_reqs.num_computed_tokens", [4, 128]), "exceed max_model_len"),
    ("negative output count", _set("scheduled_cached_reqs.num_output_tokens", [1, -1]), "num_output_tokens"),
]


@pytest.mark.parametrize("name,mutate,match", PREFILL_ATTACKS, ids=[a[0] for a in PREFILL_ATTACKS])
def test_prefill_attacks_refused(name, mutate, match):
    so = prefill()
    mutate(so)
    with pytest.raises(WireError, match=match):
        check_scheduler_output(so, LIM)


@pytest.mark.parametrize("name,mutate,match", DECODE_ATTACKS, ids=[a[0] for a in DECODE_ATTACKS])
def test_decode_attacks_refused(name, mutate, match):
    so = decode()
    mutate(so)
    with pytest.raises(WireError, match=match):
        check_scheduler_output(so, LIM)


def test_spec_decode_allowed_within_the_session():
    lim = LIM.replace(max_spec_tokens=2)
    so = decode()
    so.num_scheduled_tokens["a"] = 3
    so.total_num_scheduled_tokens = 4
    so.scheduled_spec_decode_tokens = {"a": [7, -1]}  # -1: a placeholder draft
    so.num_spec_tokens_to_schedule = 2
    check_scheduler_output(so, lim)
    so.scheduled_spec_decode_tokens = {"a": [7, 8, 9]}
    with pytest.raises(WireError, match="3 tokens"):
        check_scheduler_output(so, lim)


def test_sampling_params_validation_errors_become_wire_errors():
    import msgspec

    d = msgspec.msgpack.decode(msgspec.msgpack.encode(sp()))
    d["n"] = -5  # SamplingParams.__post_init__ raises its own error type: it must surface as WireError
    with pytest.raises(WireError, match="n must be at least 1"):
        schedwire.decode_sampling_params(msgspec.msgpack.encode(d))
    check_sampling_params(sp(logprobs=5, stop_token_ids=[99]), LIM)


# ------------------------------------------------------------------ hidden states


def hidden(rows: int, dtype=torch.bfloat16, cols: int = 8) -> dict:
    return {"hidden_states": torch.zeros(rows, cols, dtype=dtype), "residual": torch.zeros(rows, cols, dtype=dtype)}


def test_hidden_states_checked():
    so = decode()
    check_hidden_states(hidden(2), so, LIM)
    check_hidden_states(None, SchedulerOutput.make_empty(), LIM)
    for bad, match in [
        (hidden(3), r"shape \(3, 8\)"),
        (hidden(1), r"shape \(1, 8\)"),
        (hidden(2, cols=9), r"shape \(2, 9\)"),
        (hidden(2, dtype=torch.float32), "dtype float32"),
        ({"hidden_states": torch.zeros(2, 8, dtype=torch.bfloat16)}, "expected"),
        ({**hidden(2), "extra": torch.zeros(2, 8, dtype=torch.bfloat16)}, "expected"),
        ({"hidden_states": torch.zeros(16, dtype=torch.bfloat16), "residual": torch.zeros(2, 8, dtype=torch.bfloat16)}, "shape"),
        (None, "must be a map"),
    ]:
        with pytest.raises(WireError, match=match):
            check_hidden_states(bad, so, LIM)
    with pytest.raises(WireError, match="no scheduled tokens"):
        check_hidden_states(hidden(2), SchedulerOutput.make_empty(), LIM)
    check_hidden_states(hidden(4), so, LIM.replace(max_row_padding=2))  # a padded sender, when allowed


# ------------------------------------------------------------------ model runner output


def mro(**kw) -> ModelRunnerOutput:
    base = dict(req_ids=["b", "a"], req_id_to_index={"b": 0, "a": 1}, sampled_token_ids=[[12], [11]])
    base.update(kw)
    return ModelRunnerOutput(**base)


def logprobs(rows: int, k: int = 3) -> LogprobsLists:
    return LogprobsLists(np.ones((rows, k), np.int64), np.zeros((rows, k), np.float32), np.zeros(rows, np.int64))


def test_honest_model_runner_outputs_pass():
    so = decode()
    check_model_runner_output(mro(), so, LIM)
    check_model_runner_output(mro(logprobs=logprobs(2, 6)), so, LIM)
    check_model_runner_output(mro(sampled_token_ids=[[], [11]]), so, LIM)  # a partial prefill samples nothing
    pre = prefill()
    pre.scheduled_new_reqs[1].sampling_params = sp(prompt_logprobs=2)
    plp = LogprobsTensors(torch.ones(19, 3, dtype=torch.int64), torch.zeros(19, 3), torch.zeros(19, dtype=torch.int64))
    check_model_runner_output(mro(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1},
                                  prompt_logprobs_dict={"b": plp}), pre, LIM)
    with pytest.raises(WireError, match="did not ask"):
        check_model_runner_output(mro(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1},
                                      prompt_logprobs_dict={"a": plp}), pre, LIM)
    # through the wire codec too
    out = schedwire.decode_model_runner_output(schedwire.encode_model_runner_output(mro(logprobs=logprobs(2))))
    check_model_runner_output(out, so, LIM)


MRO_ATTACKS = [
    ("token outside the vocabulary", dict(sampled_token_ids=[[12], [100]]), "holds 100"),
    ("negative token", dict(sampled_token_ids=[[-1], [11]]), "holds -1"),
    ("two tokens without spec decoding", dict(sampled_token_ids=[[12, 13], [11]]), "at most 1"),
    ("a request missing", dict(req_ids=["b"], req_id_to_index={"b": 0}, sampled_token_ids=[[1]]), "scheduled 2"),
    ("a stranger request", dict(req_ids=["b", "x"], req_id_to_index={"b": 0, "x": 1}), "scheduled 2"),
    ("index map lies", dict(req_id_to_index={"b": 1, "a": 0}), "req_id_to_index"),
    ("one entry short", dict(sampled_token_ids=[[12]]), "1 entries for 2"),
    ("logprob rows wrong", dict(logprobs=logprobs(3)), "shapes"),
    ("logprob columns over the limit", dict(logprobs=logprobs(2, 7)), "7 columns"),
    ("logprob token outside the vocabulary",
     dict(logprobs=LogprobsLists(np.full((2, 2), 100), np.zeros((2, 2), np.float32), np.zeros(2, np.int64))), "outside"),
    ("prompt logprobs for a request not in the step",
     dict(prompt_logprobs_dict={"x": None}), "not scheduled"),
    ("pooling output", dict(pooler_output=[None, None]), "pooler_output"),
]


@pytest.mark.parametrize("name,kw,match", MRO_ATTACKS, ids=[a[0] for a in MRO_ATTACKS])
def test_model_runner_output_attacks_refused(name, kw, match):
    with pytest.raises(WireError, match=match):
        check_model_runner_output(mro(**kw), decode(), LIM)


def test_checks_leave_honest_messages_unchanged():
    so = prefill()
    before = copy.deepcopy(schedwire.encode_scheduler_output(so))
    check_scheduler_output(so, LIM)
    assert schedwire.encode_scheduler_output(so) == before
