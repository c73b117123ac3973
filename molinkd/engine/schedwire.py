"""vLLM V1 scheduler/worker messages <-> plain msgpack-able values, field by field, no pickle.

Three message kinds cross stage boundaries:

- ``SchedulerOutput`` (head -> every stage): encoded with an explicit field list. It is already a
  delta (new requests in full, cached requests only what changed), so nothing else is needed.
- ``GrammarOutput`` (head -> last stage, structured output bitmask).
- ``ModelRunnerOutput`` (last stage -> head): sampled tokens, logprobs, prompt logprobs.

Every field of the vLLM dataclasses is either carried or refused with :class:`WireError` when set
(connector metadata, LoRA, multimodal features, pooling: features this project does not serve
over the swarm yet). :data:`HANDLED_FIELDS` lists them; the unit tests check it matches vLLM's
dataclasses, so a vLLM upgrade that adds a field fails loudly instead of silently dropping it.

``SamplingParams`` is a msgspec Struct: it travels as msgspec-msgpack bytes decoded with a typed
decoder (every field validated, private ones included); msgspec never executes code.

Tensors and numpy arrays travel as ``{"dtype", "shape", "data"}`` (see :mod:`p2p.tensors`).
Decoding validates types and raises :class:`WireError` (a :class:`p2p.framing.FrameError`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import numpy as np
import torch

from p2p.framing import FrameError
from p2p.tensors import from_wire, to_wire
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import (
    CachedRequestData,
    GrammarOutput,
    NewRequestData,
    ScheduledEncoderInputStats,
    SchedulerOutput,
)
from vllm.v1.outputs import LogprobsLists, LogprobsTensors, ModelRunnerOutput, SamplingMaskLists


class WireError(FrameError):
    """A message cannot be encoded (unsupported feature in use) or decoded (malformed)."""


_SP_DECODER = msgspec.msgpack.Decoder(SamplingParams)

# Fields whose value must be "unset" (None/False/empty) to cross the wire: features not served yet.
_NEW_REQ_REFUSED = {"mm_features": [], "pooling_params": None, "lora_request": None}
_SCHED_REFUSED = {
    "kv_connector_metadata": None,
    "aux_output_connector_metadata": None,
    "ec_connector_metadata": None,
    "ec_manager_metadata": None,
    "kv_connector_block_state": None,
    "has_sync_kv_loads": False,
}
_MRO_REFUSED = {
    "kv_connector_output": None,
    "ec_connector_output": None,
    "aux_output_connector_output": None,
}

HANDLED_FIELDS = {
    NewRequestData: {
        "req_id", "prompt_token_ids", "mm_features", "sampling_params", "pooling_params",
        "block_ids", "num_computed_tokens", "lora_request", "prompt_embeds", "prompt_is_token_ids",
        "prefill_token_ids", "replay_start",
    },
    CachedRequestData: {
        "req_ids", "resumed_req_ids", "new_token_ids", "all_token_ids", "new_block_ids",
        "num_computed_tokens", "num_output_tokens",
    },
    SchedulerOutput: {
        "scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
        "total_num_scheduled_tokens", "scheduled_spec_decode_tokens", "scheduled_encoder_inputs",
        "finished_req_ids", "free_encoder_mm_hashes", "scheduled_encoder_input_stats",
        "preempted_req_ids", "has_structured_output_requests", "pending_structured_output_tokens",
        "num_invalid_spec_tokens", "kv_connector_metadata", "has_sync_kv_loads",
        "aux_output_connector_metadata", "ec_connector_metadata", "ec_manager_metadata",
        "new_block_ids_to_zero", "kv_cache_block_copies", "kv_connector_block_state",
        "num_spec_tokens_to_schedule", "num_common_prefix_blocks",
    },
    ModelRunnerOutput: {
        "req_ids", "req_id_to_index", "sampled_token_ids", "logprobs", "prompt_logprobs_dict",
        "prompt_token_id_logprobs_dict", "pooler_output", "kv_connector_output",
        "ec_connector_output", "num_nans_in_logits", "cudagraph_stats",
        "aux_output_connector_output", "sampling_masks",
    },
    GrammarOutput: {"structured_output_request_ids", "grammar_bitmask", "num_acceptable_drafts"},
}


def _refuse(obj: Any, refused: dict[str, Any], what: str) -> None:
    for name, unset in refused.items():
        value = getattr(obj, name)
        if value is None and unset is None:
            continue
        if value == unset or (unset == [] and not value):
            continue
        raise WireError(
            f"{what}.{name} is set ({type(value).__name__}); this feature is not supported across "
            "pipeline stages yet: serve the model on one node to use it"
        )


# --- small typed readers ------------------------------------------------------------------


def _get(d: Any, key: str, kind: Any, *, optional: bool = False, where: str = "") -> Any:
    if not isinstance(d, dict):
        raise WireError(f"{where or 'message'} must be a map")
    if key not in d:
        raise WireError(f"{where}: missing field {key!r}")
    v = d[key]
    if v is None and optional:
        return None
    if kind is int and isinstance(v, bool):
        raise WireError(f"{where}.{key} must be int, got bool")
    if not isinstance(v, kind):
        raise WireError(f"{where}.{key} has type {type(v).__name__}, expected {kind}")
    return v


def _ints(v: Any, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise WireError(f"{where} must be a list of ints")
    return v


def _strs(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise WireError(f"{where} must be a list of strings")
    return v


def _str_map(v: Any, where: str, check) -> dict:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise WireError(f"{where} must be a map with string keys")
    for k, x in v.items():
        check(x, f"{where}[{k!r}]")
    return v


def _int_val(x: Any, where: str) -> None:
    if not isinstance(x, int) or isinstance(x, bool):
        raise WireError(f"{where} must be int")


def _block_ids(v: Any, where: str) -> tuple[list[int], ...]:
    if not isinstance(v, list):
        raise WireError(f"{where} must be a list of block-id lists")
    return tuple(_ints(g, f"{where}[{i}]") for i, g in enumerate(v))


def _np_to_wire(a: np.ndarray) -> dict:
    return to_wire(torch.from_numpy(np.ascontiguousarray(a)))


def _np_from_wire(d: Any) -> np.ndarray:
    return from_wire(d).numpy()


def _opt(v: Any, fn) -> Any:
    return None if v is None else fn(v)


# --- SamplingParams -----------------------------------------------------------------------


def encode_sampling_params(sp: SamplingParams | None) -> bytes | None:
    if sp is None:
        return None
    if getattr(sp, "logits_processors", None):
        raise WireError("SamplingParams.logits_processors (Python callables) cannot cross the wire")
    try:
        return msgspec.msgpack.encode(sp)
    except (TypeError, msgspec.EncodeError) as e:
        raise WireError(f"SamplingParams cannot be encoded: {e}") from None


def decode_sampling_params(b: Any) -> SamplingParams | None:
    if b is None:
        return None
    if not isinstance(b, (bytes, bytearray)):
        raise WireError("sampling_params must be bytes")
    try:
        return _SP_DECODER.decode(b)
    except msgspec.MsgspecError as e:
        raise WireError(f"bad sampling_params: {e}") from None


# --- SchedulerOutput ----------------------------------------------------------------------


def _encode_new_req(r: NewRequestData) -> dict:
    _refuse(r, _NEW_REQ_REFUSED, "NewRequestData")
    return {
        "req_id": r.req_id,
        "prompt_token_ids": r.prompt_token_ids,
        "sampling_params": encode_sampling_params(r.sampling_params),
        "block_ids": [list(g) for g in r.block_ids],
        "num_computed_tokens": r.num_computed_tokens,
        "prompt_embeds": _opt(r.prompt_embeds, to_wire),
        "prompt_is_token_ids": r.prompt_is_token_ids,
        "prefill_token_ids": r.prefill_token_ids,
        "replay_start": r.replay_start,
    }


def _decode_new_req(d: Any) -> NewRequestData:
    w = "NewRequestData"
    ptids = _get(d, "prompt_token_ids", list, optional=True, where=w)
    pfill = _get(d, "prefill_token_ids", list, optional=True, where=w)
    pis = _get(d, "prompt_is_token_ids", list, optional=True, where=w)
    if pis is not None and not all(isinstance(x, bool) for x in pis):
        raise WireError(f"{w}.prompt_is_token_ids must be a list of bools")
    return NewRequestData(
        req_id=_get(d, "req_id", str, where=w),
        prompt_token_ids=_opt(ptids, lambda v: _ints(v, f"{w}.prompt_token_ids")),
        mm_features=[],
        sampling_params=decode_sampling_params(d.get("sampling_params")),
        pooling_params=None,
        block_ids=_block_ids(_get(d, "block_ids", list, where=w), f"{w}.block_ids"),
        num_computed_tokens=_get(d, "num_computed_tokens", int, where=w),
        lora_request=None,
        prompt_embeds=_opt(_get(d, "prompt_embeds", dict, optional=True, where=w), from_wire),
        prompt_is_token_ids=pis,
        prefill_token_ids=_opt(pfill, lambda v: _ints(v, f"{w}.prefill_token_ids")),
        replay_start=_get(d, "replay_start", int, where=w),
    )


def _encode_cached(c: CachedRequestData) -> dict:
    return {
        "req_ids": list(c.req_ids),
        "resumed_req_ids": sorted(c.resumed_req_ids),
        "new_token_ids": [list(x) for x in c.new_token_ids],
        "all_token_ids": {k: list(v) for k, v in c.all_token_ids.items()},
        "new_block_ids": [None if b is None else [list(g) for g in b] for b in c.new_block_ids],
        "num_computed_tokens": list(c.num_computed_tokens),
        "num_output_tokens": list(c.num_output_tokens),
    }


def _decode_cached(d: Any) -> CachedRequestData:
    w = "CachedRequestData"
    req_ids = _strs(_get(d, "req_ids", list, where=w), f"{w}.req_ids")
    n = len(req_ids)
    new_tok = _get(d, "new_token_ids", list, where=w)
    nbi = _get(d, "new_block_ids", list, where=w)
    nct = _ints(_get(d, "num_computed_tokens", list, where=w), f"{w}.num_computed_tokens")
    nout = _ints(_get(d, "num_output_tokens", list, where=w), f"{w}.num_output_tokens")
    if len(nbi) != n or len(nct) != n or len(nout) != n or (new_tok and len(new_tok) != n):
        raise WireError(f"{w}: per-request lists do not all have {n} entries")
    return CachedRequestData(
        req_ids=req_ids,
        resumed_req_ids=set(_strs(_get(d, "resumed_req_ids", list, where=w), f"{w}.resumed_req_ids")),
        new_token_ids=[_ints(x, f"{w}.new_token_ids[{i}]") for i, x in enumerate(new_tok)],
        all_token_ids=_str_map(
            _get(d, "all_token_ids", dict, where=w), f"{w}.all_token_ids", lambda x, ww: _ints(x, ww)
        ),
        new_block_ids=[None if b is None else _block_ids(b, f"{w}.new_block_ids[{i}]") for i, b in enumerate(nbi)],
        num_computed_tokens=nct,
        num_output_tokens=nout,
    )


def encode_scheduler_output(so: SchedulerOutput) -> dict:
    """SchedulerOutput -> plain dict (raises WireError if an unsupported feature is in use)."""
    _refuse(so, _SCHED_REFUSED, "SchedulerOutput")
    stats = so.scheduled_encoder_input_stats
    return {
        "scheduled_new_reqs": [_encode_new_req(r) for r in so.scheduled_new_reqs],
        "scheduled_cached_reqs": _encode_cached(so.scheduled_cached_reqs),
        "num_scheduled_tokens": dict(so.num_scheduled_tokens),
        "total_num_scheduled_tokens": so.total_num_scheduled_tokens,
        "scheduled_spec_decode_tokens": {k: list(v) for k, v in so.scheduled_spec_decode_tokens.items()},
        "scheduled_encoder_inputs": {k: list(v) for k, v in so.scheduled_encoder_inputs.items()},
        "finished_req_ids": sorted(so.finished_req_ids),
        "free_encoder_mm_hashes": list(so.free_encoder_mm_hashes),
        "scheduled_encoder_input_stats": None if stats is None else [stats.num_inputs, stats.output_tokens],
        "preempted_req_ids": None if so.preempted_req_ids is None else sorted(so.preempted_req_ids),
        "has_structured_output_requests": so.has_structured_output_requests,
        "pending_structured_output_tokens": so.pending_structured_output_tokens,
        "num_invalid_spec_tokens": so.num_invalid_spec_tokens,
        "new_block_ids_to_zero": so.new_block_ids_to_zero,
        "kv_cache_block_copies": None
        if so.kv_cache_block_copies is None
        else [[c.src_block_id, c.dst_block_id] for c in so.kv_cache_block_copies],
        "num_spec_tokens_to_schedule": so.num_spec_tokens_to_schedule,
        "num_common_prefix_blocks": list(so.num_common_prefix_blocks),
    }


def decode_scheduler_output(d: Any) -> SchedulerOutput:
    """Plain dict -> SchedulerOutput, validating every field's type (raises WireError)."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy

    w = "SchedulerOutput"
    new = [_decode_new_req(r) for r in _get(d, "scheduled_new_reqs", list, where=w)]
    nst = _str_map(_get(d, "num_scheduled_tokens", dict, where=w), f"{w}.num_scheduled_tokens", _int_val)
    total = _get(d, "total_num_scheduled_tokens", int, where=w)
    if sum(nst.values()) != total:
        raise WireError(f"{w}: total_num_scheduled_tokens {total} != sum of per-request counts")
    stats = _get(d, "scheduled_encoder_input_stats", list, optional=True, where=w)
    pre = _get(d, "preempted_req_ids", list, optional=True, where=w)
    nist = _get(d, "num_invalid_spec_tokens", dict, optional=True, where=w)
    zero = _get(d, "new_block_ids_to_zero", list, optional=True, where=w)
    copies = _get(d, "kv_cache_block_copies", list, optional=True, where=w)
    return SchedulerOutput(
        scheduled_new_reqs=new,
        scheduled_cached_reqs=_decode_cached(_get(d, "scheduled_cached_reqs", dict, where=w)),
        num_scheduled_tokens=nst,
        total_num_scheduled_tokens=total,
        scheduled_spec_decode_tokens=_str_map(
            _get(d, "scheduled_spec_decode_tokens", dict, where=w), f"{w}.scheduled_spec_decode_tokens", _ints
        ),
        scheduled_encoder_inputs=_str_map(
            _get(d, "scheduled_encoder_inputs", dict, where=w), f"{w}.scheduled_encoder_inputs", _ints
        ),
        finished_req_ids=set(_strs(_get(d, "finished_req_ids", list, where=w), f"{w}.finished_req_ids")),
        free_encoder_mm_hashes=_strs(_get(d, "free_encoder_mm_hashes", list, where=w), f"{w}.free_encoder_mm_hashes"),
        scheduled_encoder_input_stats=None
        if stats is None
        else ScheduledEncoderInputStats(*_ints(stats, f"{w}.scheduled_encoder_input_stats")[:2]),
        preempted_req_ids=None if pre is None else set(_strs(pre, f"{w}.preempted_req_ids")),
        has_structured_output_requests=_get(d, "has_structured_output_requests", bool, where=w),
        pending_structured_output_tokens=_get(d, "pending_structured_output_tokens", bool, where=w),
        num_invalid_spec_tokens=None if nist is None else _str_map(nist, f"{w}.num_invalid_spec_tokens", _int_val),
        new_block_ids_to_zero=None if zero is None else _ints(zero, f"{w}.new_block_ids_to_zero"),
        kv_cache_block_copies=None
        if copies is None
        else [KVCacheBlockCopy(*_ints(c, f"{w}.kv_cache_block_copies[]")[:2]) for c in copies],
        num_spec_tokens_to_schedule=_get(d, "num_spec_tokens_to_schedule", int, where=w),
        num_common_prefix_blocks=_ints(_get(d, "num_common_prefix_blocks", list, where=w), f"{w}.num_common_prefix_blocks"),
    )


# --- GrammarOutput ------------------------------------------------------------------------


def encode_grammar_output(g: GrammarOutput | None) -> dict | None:
    if g is None:
        return None
    return {
        "structured_output_request_ids": list(g.structured_output_request_ids),
        "grammar_bitmask": _np_to_wire(np.asarray(g.grammar_bitmask)),
        "num_acceptable_drafts": None if g.num_acceptable_drafts is None else list(g.num_acceptable_drafts),
    }


def decode_grammar_output(d: Any) -> GrammarOutput | None:
    if d is None:
        return None
    w = "GrammarOutput"
    nad = _get(d, "num_acceptable_drafts", list, optional=True, where=w)
    return GrammarOutput(
        structured_output_request_ids=_strs(
            _get(d, "structured_output_request_ids", list, where=w), f"{w}.structured_output_request_ids"
        ),
        grammar_bitmask=_np_from_wire(_get(d, "grammar_bitmask", dict, where=w)),
        num_acceptable_drafts=None if nad is None else _ints(nad, f"{w}.num_acceptable_drafts"),
    )


# --- ModelRunnerOutput --------------------------------------------------------------------


def _encode_logprobs_tensors(t: LogprobsTensors | None) -> dict | None:
    if t is None:
        return None
    cu = t.cu_num_generated_tokens
    if cu is None and t.cu_num_generated_tokens_tensor is not None:
        cu = t.cu_num_generated_tokens_tensor.tolist()
    return {
        "logprob_token_ids": to_wire(t.logprob_token_ids),
        "logprobs": to_wire(t.logprobs),
        "selected_token_ranks": to_wire(t.selected_token_ranks),
        "cu_num_generated_tokens": None if cu is None else list(cu),
    }


def _decode_logprobs_tensors(d: Any) -> LogprobsTensors | None:
    if d is None:
        return None
    w = "LogprobsTensors"
    cu = _get(d, "cu_num_generated_tokens", list, optional=True, where=w)
    return LogprobsTensors(
        from_wire(_get(d, "logprob_token_ids", dict, where=w)),
        from_wire(_get(d, "logprobs", dict, where=w)),
        from_wire(_get(d, "selected_token_ranks", dict, where=w)),
        None if cu is None else _ints(cu, f"{w}.cu_num_generated_tokens"),
    )


def encode_model_runner_output(o: ModelRunnerOutput) -> dict:
    _refuse(o, _MRO_REFUSED, "ModelRunnerOutput")
    lp = o.logprobs
    sm = o.sampling_masks
    return {
        "req_ids": list(o.req_ids),
        "req_id_to_index": dict(o.req_id_to_index),
        "sampled_token_ids": [list(map(int, x)) for x in o.sampled_token_ids],
        "logprobs": None
        if lp is None
        else {
            "logprob_token_ids": _np_to_wire(lp.logprob_token_ids),
            "logprobs": _np_to_wire(lp.logprobs),
            "sampled_token_ranks": _np_to_wire(lp.sampled_token_ranks),
            "cu_num_generated_tokens": None if lp.cu_num_generated_tokens is None else list(lp.cu_num_generated_tokens),
        },
        "prompt_logprobs_dict": {k: _encode_logprobs_tensors(v) for k, v in o.prompt_logprobs_dict.items()},
        "prompt_token_id_logprobs_dict": {k: to_wire(v) for k, v in o.prompt_token_id_logprobs_dict.items()},
        "pooler_output": None if o.pooler_output is None else [_opt(t, to_wire) for t in o.pooler_output],
        "num_nans_in_logits": o.num_nans_in_logits,
        # cudagraph_stats: GPU-only metrics, not carried (never needed by the scheduler)
        "sampling_masks": None
        if sm is None
        else {
            "token_ids": _np_to_wire(sm.token_ids),
            "offsets": _opt(sm.offsets, _np_to_wire),
            "cu_num_generated_tokens": None if sm.cu_num_generated_tokens is None else list(sm.cu_num_generated_tokens),
        },
    }


def decode_model_runner_output(d: Any) -> ModelRunnerOutput:
    w = "ModelRunnerOutput"
    req_ids = _strs(_get(d, "req_ids", list, where=w), f"{w}.req_ids")
    idx = _str_map(_get(d, "req_id_to_index", dict, where=w), f"{w}.req_id_to_index", _int_val)
    sampled = [_ints(x, f"{w}.sampled_token_ids[{i}]") for i, x in enumerate(_get(d, "sampled_token_ids", list, where=w))]
    lpd = _get(d, "logprobs", dict, optional=True, where=w)
    logprobs = None
    if lpd is not None:
        cu = _get(lpd, "cu_num_generated_tokens", list, optional=True, where="logprobs")
        logprobs = LogprobsLists(
            _np_from_wire(_get(lpd, "logprob_token_ids", dict, where="logprobs")),
            _np_from_wire(_get(lpd, "logprobs", dict, where="logprobs")),
            _np_from_wire(_get(lpd, "sampled_token_ranks", dict, where="logprobs")),
            None if cu is None else _ints(cu, "logprobs.cu_num_generated_tokens"),
        )
    pld = _get(d, "prompt_logprobs_dict", dict, where=w)
    ptl = _get(d, "prompt_token_id_logprobs_dict", dict, where=w)
    pooler = _get(d, "pooler_output", list, optional=True, where=w)
    nans = _get(d, "num_nans_in_logits", dict, optional=True, where=w)
    smd = _get(d, "sampling_masks", dict, optional=True, where=w)
    masks = None
    if smd is not None:
        cu = _get(smd, "cu_num_generated_tokens", list, optional=True, where="sampling_masks")
        offs = _get(smd, "offsets", dict, optional=True, where="sampling_masks")
        masks = SamplingMaskLists(
            _np_from_wire(_get(smd, "token_ids", dict, where="sampling_masks")),
            None if offs is None else _np_from_wire(offs),
            None if cu is None else _ints(cu, "sampling_masks.cu_num_generated_tokens"),
        )
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index=idx,
        sampled_token_ids=sampled,
        logprobs=logprobs,
        prompt_logprobs_dict={str(k): _decode_logprobs_tensors(v) for k, v in pld.items()},
        prompt_token_id_logprobs_dict={str(k): from_wire(v) for k, v in ptl.items()},
        pooler_output=None if pooler is None else [_opt(t, from_wire) for t in pooler],
        num_nans_in_logits=None if nans is None else _str_map(nans, f"{w}.num_nans_in_logits", _int_val),
        sampling_masks=masks,
    )


def dataclass_field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
