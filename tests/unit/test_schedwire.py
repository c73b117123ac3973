"""Round trips of vLLM V1 scheduler/worker messages through the explicit field codec."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import torch

from molinkd.engine import schedwire
from molinkd.engine.schedwire import WireError
from p2p.framing import decode_payload, encode_frame
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy
from vllm.v1.core.sched.output import (
    CachedRequestData,
    GrammarOutput,
    NewRequestData,
    ScheduledEncoderInputStats,
    SchedulerOutput,
)
from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput


def over_the_wire(d):
    """Through a real frame: only plain msgpack values survive."""
    return decode_payload(encode_frame("eng.step", d)[4:]).body


def sampling_params(**kw):
    sp = SamplingParams(
        temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, seed=1234, max_tokens=24, stop=["\n\n"],
        stop_token_ids=[7], logprobs=3, prompt_logprobs=1, presence_penalty=0.1, frequency_penalty=0.2,
        repetition_penalty=1.1, logit_bias={5: -1.5}, allowed_token_ids=None, min_tokens=2,
        output_kind=RequestOutputKind.DELTA, **kw,
    )
    sp.update_from_generation_config({}, eos_token_id=2)
    return sp


def new_req(rid="r1", **kw):
    base = dict(
        req_id=rid, prompt_token_ids=[1, 2, 3, 4], mm_features=[], sampling_params=sampling_params(),
        pooling_params=None, block_ids=([0, 1],), num_computed_tokens=0, lora_request=None,
    )
    base.update(kw)
    return NewRequestData(**base)


def prefill_step() -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=[new_req("r1"), new_req("r2", prompt_token_ids=[9, 8], block_ids=([2],))],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={"r1": 4, "r2": 2},
        total_num_scheduled_tokens=6,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
        new_block_ids_to_zero=[0, 1, 2],
    )


def decode_step() -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData(
            req_ids=["r1", "r2"],
            resumed_req_ids={"r2"},
            new_token_ids=[[11], [12]],
            all_token_ids={"r2": [9, 8, 12]},
            new_block_ids=[None, ([3],)],
            num_computed_tokens=[4, 2],
            num_output_tokens=[1, 1],
        ),
        num_scheduled_tokens={"r1": 1, "r2": 1},
        total_num_scheduled_tokens=2,
        scheduled_spec_decode_tokens={"r1": [5, 6]},
        scheduled_encoder_inputs={},
        finished_req_ids={"r0"},
        free_encoder_mm_hashes=["h"],
        scheduled_encoder_input_stats=ScheduledEncoderInputStats(1, 2),
        preempted_req_ids={"r9"},
        has_structured_output_requests=True,
        pending_structured_output_tokens=False,
        num_invalid_spec_tokens={"r1": 1},
        kv_cache_block_copies=[KVCacheBlockCopy(1, 4)],
        num_spec_tokens_to_schedule=2,
        num_common_prefix_blocks=[0],
    )


def assert_same(a, b):
    """Dataclass equality, comparing SamplingParams field by field (incl. private fields)."""
    assert type(a) is type(b)
    if isinstance(a, SamplingParams):
        for f in a.__struct_fields__:
            assert getattr(a, f) == getattr(b, f), f
        return
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
        return
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
        return
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
        return
    assert a == b


@pytest.mark.parametrize("make", [prefill_step, decode_step, SchedulerOutput.make_empty])
def test_scheduler_output_round_trip(make):
    so = make()
    back = schedwire.decode_scheduler_output(over_the_wire(schedwire.encode_scheduler_output(so)))
    assert_same(so, back)


def test_prompt_embeds_and_structured_output_params_travel():
    sp = sampling_params(structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    so = prefill_step()
    so.scheduled_new_reqs[0] = new_req("r1", sampling_params=sp, prompt_embeds=torch.randn(4, 8, dtype=torch.bfloat16))
    back = schedwire.decode_scheduler_output(over_the_wire(schedwire.encode_scheduler_output(so)))
    assert_same(so, back)
    assert back.scheduled_new_reqs[0].sampling_params.structured_outputs.json == {"type": "object"}


def test_decode_step_is_small():
    # a decode step of two requests is a delta: well under a kilobyte
    assert len(msgpack.packb(schedwire.encode_scheduler_output(decode_step()))) < 700


def test_every_vllm_field_is_handled():
    for cls, handled in schedwire.HANDLED_FIELDS.items():
        assert schedwire.dataclass_field_names(cls) == handled, cls.__name__


def test_unsupported_features_are_refused_by_name():
    so = prefill_step()
    so.scheduled_new_reqs[0].lora_request = object()
    with pytest.raises(WireError, match="lora_request"):
        schedwire.encode_scheduler_output(so)
    so = prefill_step()
    so.kv_connector_metadata = object()
    with pytest.raises(WireError, match="kv_connector_metadata"):
        schedwire.encode_scheduler_output(so)


@pytest.mark.parametrize(
    "make,mutate,match",
    [
        (prefill_step, lambda d: d.pop("num_scheduled_tokens"), "num_scheduled_tokens"),
        (prefill_step, lambda d: d.__setitem__("total_num_scheduled_tokens", 99), "total_num_scheduled_tokens"),
        (prefill_step, lambda d: d.__setitem__("finished_req_ids", [1]), "finished_req_ids"),
        (prefill_step, lambda d: d["scheduled_new_reqs"][0].__setitem__("block_ids", [["x"]]), "block_ids"),
        (prefill_step, lambda d: d["scheduled_new_reqs"][0].__setitem__("sampling_params", b"\x01junk"), "sampling_params"),
        (prefill_step, lambda d: d["scheduled_new_reqs"][0].__setitem__("num_computed_tokens", True), "bool"),
        (decode_step, lambda d: d["scheduled_cached_reqs"].__setitem__("num_output_tokens", [1, 2, 3]), "entries"),
        (decode_step, lambda d: d["scheduled_cached_reqs"].__setitem__("new_block_ids", [None, [[1.5]]]), "new_block_ids"),
    ],
)
def test_malformed_scheduler_output_rejected(make, mutate, match):
    d = over_the_wire(schedwire.encode_scheduler_output(make()))
    mutate(d)
    with pytest.raises(WireError, match=match):
        schedwire.decode_scheduler_output(d)


def test_model_runner_output_round_trip():
    out = ModelRunnerOutput(
        req_ids=["r1", "r2"],
        req_id_to_index={"r1": 0, "r2": 1},
        sampled_token_ids=[[11], [12]],
        logprobs=LogprobsLists(
            np.array([[11, 3, 4], [12, 5, 6]], dtype=np.int32),
            np.array([[-0.1, -2.0, -3.0], [-0.2, -1.5, -4.0]], dtype=np.float32),
            np.array([1, 1], dtype=np.int32),
            None,
        ),
        prompt_logprobs_dict={
            "r1": LogprobsTensors(
                torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
                torch.tensor([[-1.0, -2.0], [-0.5, -3.0]]),
                torch.tensor([1, 2], dtype=torch.int32),
            ),
            "r2": None,
        },
        num_nans_in_logits={"r1": 0},
    )
    back = schedwire.decode_model_runner_output(over_the_wire(schedwire.encode_model_runner_output(out)))
    assert_same(out, back)


def test_empty_model_runner_output_round_trip():
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    back = schedwire.decode_model_runner_output(over_the_wire(schedwire.encode_model_runner_output(EMPTY_MODEL_RUNNER_OUTPUT)))
    assert back.req_ids == [] and back.sampled_token_ids == [] and back.logprobs is None


def test_grammar_output_round_trip():
    g = GrammarOutput(["r1"], np.array([[1, -1, 0]], dtype=np.int32), [1])
    back = schedwire.decode_grammar_output(over_the_wire(schedwire.encode_grammar_output(g)))
    assert_same(g, back)
    assert schedwire.decode_grammar_output(schedwire.encode_grammar_output(None)) is None
