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


def _pair(v: Any, where: str) -> list[int]:
    if len(_ints(v, where)) != 2:
        raise WireError(f"{where} must be a pair of ints")
    return v


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
    except Exception as e:  # msgspec errors, and SamplingParams.__post_init__'s own validation errors
        raise WireError(f"bad sampling_params: {type(e).__name__}: {e}") from None


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
        else ScheduledEncoderInputStats(*_pair(stats, f"{w}.scheduled_encoder_input_stats")),
        preempted_req_ids=None if pre is None else set(_strs(pre, f"{w}.preempted_req_ids")),
        has_structured_output_requests=_get(d, "has_structured_output_requests", bool, where=w),
        pending_structured_output_tokens=_get(d, "pending_structured_output_tokens", bool, where=w),
        num_invalid_spec_tokens=None if nist is None else _str_map(nist, f"{w}.num_invalid_spec_tokens", _int_val),
        new_block_ids_to_zero=None if zero is None else _ints(zero, f"{w}.new_block_ids_to_zero"),
        kv_cache_block_copies=None
        if copies is None
        else [KVCacheBlockCopy(*_pair(c, f"{w}.kv_cache_block_copies[{i}]")) for i, c in enumerate(copies)],
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


# --- checks against the session's agreed limits ---------------------------------------------
#
# The decoders above only check types. Before a message reaches vLLM, every value must also be
# in range for the session (vLLM's CPU kernels do not bounds-check block ids: an unchecked id is
# an out-of-bounds write in the stage process). Each check is O(size of the message) and
# raises WireError naming the field.

MAX_REQ_ID_LEN = 512


def _span(v: list[int], lo: int, hi: int, where: str) -> None:
    """Every int of ``v`` in [lo, hi) (min/max run in C)."""
    if v and (min(v) < lo or max(v) >= hi):
        bad = next(x for x in v if not lo <= x < hi)
        raise WireError(f"{where} holds {bad}, outside [{lo}, {hi})")


def _count(v: int, lo: int, hi: int, where: str) -> None:
    if not lo <= v <= hi:
        raise WireError(f"{where} is {v}, outside [{lo}, {hi}]")


def _req_id(r: str, where: str) -> None:
    if not r or len(r) > MAX_REQ_ID_LEN:
        raise WireError(f"{where}: request ids must be 1..{MAX_REQ_ID_LEN} characters")


def _groups(groups: Any, lim: Any, where: str) -> None:
    """One block-id list per KV-cache group, each id an allocated block, at most a request's
    whole context of blocks per group."""
    if len(groups) != lim.kv_groups:
        raise WireError(f"{where} has {len(groups)} block groups, the session has {lim.kv_groups}")
    per_req = lim.max_blocks_per_req
    for g, ids in enumerate(groups):
        if len(ids) > per_req:
            raise WireError(f"{where}[{g}] lists {len(ids)} blocks, a request holds at most {per_req}")
        _span(ids, 0, lim.num_blocks, f"{where}[{g}] (block ids)")


def _token_lists(sp: Any, name: str, v: Any, vocab: int, where: str) -> None:
    if v is None:
        return
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (set, frozenset, tuple)):
        v = list(v)
    if not isinstance(v, list):
        raise WireError(f"{where}.{name} must be a list of token ids")
    rows = v if v and isinstance(v[0], list) else [v]
    for row in rows:
        if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise WireError(f"{where}.{name} must hold token ids")
        _span(row, 0, vocab, f"{where}.{name}")


def check_sampling_params(sp: SamplingParams, lim: Any, where: str = "sampling_params") -> None:
    """What vLLM checks against the model config in its input processor (``SamplingParams.verify``),
    which a decoded SamplingParams skipped: msgspec runs ``__post_init__`` (n, temperature, top_p,
    top_k, max_tokens, min_tokens are validated there) but nothing knows the vocabulary or the
    logprob limit. Every token-id field must be in the vocabulary, logprob counts within limits."""
    mx = lim.max_logprobs
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(sp, name)
        if v is not None and not 0 <= v <= mx:
            raise WireError(f"{where}.{name} is {v}, the session allows 0..{mx}")
    if sp.logprob_token_ids is not None and len(sp.logprob_token_ids) > mx:
        raise WireError(f"{where}.logprob_token_ids lists {len(sp.logprob_token_ids)} ids, the session allows {mx}")
    if sp.max_tokens is not None and sp.max_tokens > lim.max_model_len:
        raise WireError(f"{where}.max_tokens {sp.max_tokens} exceeds max_model_len {lim.max_model_len}")
    vocab = lim.vocab_size
    for name in ("stop_token_ids", "_all_stop_token_ids", "allowed_token_ids", "_bad_words_token_ids",
                 "logprob_token_ids", "prompt_logprob_token_ids", "trace_decode_token_ids"):
        _token_lists(sp, name, getattr(sp, name, None), vocab, where)
    if sp.logit_bias:
        _span(list(sp.logit_bias), 0, vocab, f"{where}.logit_bias (token ids)")
    eos = sp._eos_token_id
    if eos is not None and not (isinstance(eos, int) and 0 <= eos < vocab):
        raise WireError(f"{where}._eos_token_id {eos!r} is not a token id")


def check_scheduler_output(so: SchedulerOutput, lim: Any) -> None:
    """Check a decoded SchedulerOutput against the session's :class:`molinkd.limits.SessionLimits`
    (raises WireError naming the field). Block ids in [0, num_blocks) with one list per KV group,
    token/request counts within the batch limits and consistent with each other, positions within
    max_model_len, token ids within the vocabulary, sampling parameters within the model's limits,
    no speculative tokens beyond ``max_spec_tokens``, no encoder (multimodal) inputs."""
    w = "SchedulerOutput"
    nst = so.num_scheduled_tokens
    cached = so.scheduled_cached_reqs
    vocab, mml = lim.vocab_size, lim.max_model_len
    nreq = len(nst)
    if nreq > lim.max_num_seqs:
        raise WireError(f"{w}.num_scheduled_tokens schedules {nreq} requests, the session allows {lim.max_num_seqs}")
    total = so.total_num_scheduled_tokens
    _count(total, 0, lim.max_num_batched_tokens, f"{w}.total_num_scheduled_tokens")
    if nst and min(nst.values()) < 0:
        raise WireError(f"{w}.num_scheduled_tokens holds a negative count")
    if sum(nst.values()) != total:
        raise WireError(f"{w}.total_num_scheduled_tokens {total} != the sum of per-request counts")
    # the step's requests: new ones and cached ones, each once, exactly those with a count
    new_ids = [r.req_id for r in so.scheduled_new_reqs]
    step_ids = set(new_ids)
    step_ids.update(cached.req_ids)
    if len(step_ids) != len(new_ids) + len(cached.req_ids):
        raise WireError(f"{w}: a request is listed twice among the new and cached requests")
    if step_ids != nst.keys():
        extra = sorted(step_ids ^ nst.keys())[:3]
        raise WireError(f"{w}: num_scheduled_tokens and the new/cached requests disagree (e.g. {extra})")
    for r in nst:
        _req_id(r, f"{w}.num_scheduled_tokens")
    # speculative decoding: none unless the session has it
    spec = so.scheduled_spec_decode_tokens
    if len(spec) > nreq or not spec.keys() <= nst.keys():
        raise WireError(f"{w}.scheduled_spec_decode_tokens names requests not scheduled in this step")
    for r, toks in spec.items():
        if len(toks) > lim.max_spec_tokens or len(toks) > max(nst[r] - 1, 0):
            raise WireError(f"{w}.scheduled_spec_decode_tokens[{r!r}] has {len(toks)} tokens "
                            f"(session allows {lim.max_spec_tokens}, {nst[r]} scheduled)")
        _span(toks, -1, vocab, f"{w}.scheduled_spec_decode_tokens[{r!r}]")
    _count(so.num_spec_tokens_to_schedule, 0, lim.max_spec_tokens, f"{w}.num_spec_tokens_to_schedule")
    nist = so.num_invalid_spec_tokens
    if nist:
        if not nist.keys() <= nst.keys():
            raise WireError(f"{w}.num_invalid_spec_tokens names requests not scheduled in this step")
        for r, v in nist.items():
            _count(v, 0, lim.max_spec_tokens, f"{w}.num_invalid_spec_tokens[{r!r}]")
    if so.scheduled_encoder_inputs or so.free_encoder_mm_hashes or so.scheduled_encoder_input_stats not in (
        None, ScheduledEncoderInputStats(0, 0)
    ):
        raise WireError(f"{w}: encoder (multimodal) inputs are not served across stages")
    # new requests
    for r in so.scheduled_new_reqs:
        ww = f"{w}.scheduled_new_reqs[{r.req_id!r}]"
        _count(r.num_computed_tokens, 0, mml, f"{ww}.num_computed_tokens")
        if r.num_computed_tokens + nst[r.req_id] > mml:
            raise WireError(f"{ww}: {r.num_computed_tokens} computed + {nst[r.req_id]} scheduled tokens "
                            f"exceed max_model_len {mml}")
        plen = 0
        if r.prompt_token_ids is not None:
            plen = len(r.prompt_token_ids)
            _count(plen, 0, mml, f"{ww}.prompt_token_ids (length)")
            _span(r.prompt_token_ids, 0, vocab, f"{ww}.prompt_token_ids")
        if r.prefill_token_ids is not None:
            _count(len(r.prefill_token_ids), 0, mml, f"{ww}.prefill_token_ids (length)")
            _span(r.prefill_token_ids, 0, vocab, f"{ww}.prefill_token_ids")
        if r.prompt_embeds is not None:
            e = r.prompt_embeds
            if e.dim() != 2 or e.shape[1] != lim.hidden_size or e.shape[0] > mml or not e.dtype.is_floating_point:
                raise WireError(f"{ww}.prompt_embeds has shape {tuple(e.shape)} and dtype {e.dtype}, expected "
                                f"(<= {mml}, {lim.hidden_size}) floating point")
            plen = max(plen, e.shape[0])
        if r.prompt_token_ids is None and r.prompt_embeds is None:
            raise WireError(f"{ww} has neither prompt_token_ids nor prompt_embeds")
        if r.prompt_is_token_ids is not None and len(r.prompt_is_token_ids) != plen:
            raise WireError(f"{ww}.prompt_is_token_ids has {len(r.prompt_is_token_ids)} entries for a "
                            f"{plen}-token prompt")
        _count(r.replay_start, 0, mml, f"{ww}.replay_start")
        _groups(r.block_ids, lim, f"{ww}.block_ids")
        if r.sampling_params is None:
            raise WireError(f"{ww} has no sampling_params (pooling is not served across stages)")
        check_sampling_params(r.sampling_params, lim, f"{ww}.sampling_params")
    # cached requests
    wc = f"{w}.scheduled_cached_reqs"
    n = len(cached.req_ids)
    cached_ids = set(cached.req_ids)
    if not cached.resumed_req_ids <= cached_ids or not cached.all_token_ids.keys() <= cached_ids:
        raise WireError(f"{wc}: resumed_req_ids/all_token_ids name requests not in req_ids")
    for i, rid in enumerate(cached.req_ids):
        nc = cached.num_computed_tokens[i]
        _count(nc, 0, mml, f"{wc}.num_computed_tokens[{i}]")
        if nc + nst[rid] > mml:
            raise WireError(f"{wc}[{rid!r}]: {nc} computed + {nst[rid]} scheduled tokens exceed max_model_len {mml}")
        _count(cached.num_output_tokens[i], 0, mml, f"{wc}.num_output_tokens[{i}]")
        b = cached.new_block_ids[i]
        if b is not None:
            _groups(b, lim, f"{wc}.new_block_ids[{i}]")
        if cached.new_token_ids:
            toks = cached.new_token_ids[i]
            want = nst[rid] - len(spec.get(rid, ()))
            if len(toks) != want:
                raise WireError(f"{wc}.new_token_ids[{i}] has {len(toks)} tokens, {want} are scheduled")
            _span(toks, 0, vocab, f"{wc}.new_token_ids[{i}]")
    if cached.new_token_ids and len(cached.new_token_ids) != n:
        raise WireError(f"{wc}.new_token_ids has {len(cached.new_token_ids)} entries for {n} requests")
    for rid, toks in cached.all_token_ids.items():
        _count(len(toks), 0, mml, f"{wc}.all_token_ids[{rid!r}] (length)")
        _span(toks, 0, vocab, f"{wc}.all_token_ids[{rid!r}]")
    # whole-cache operations
    if so.new_block_ids_to_zero:
        _span(so.new_block_ids_to_zero, 0, lim.num_blocks, f"{w}.new_block_ids_to_zero")
    if so.kv_cache_block_copies:
        if len(so.kv_cache_block_copies) > lim.num_blocks:
            raise WireError(f"{w}.kv_cache_block_copies lists more copies than blocks")
        for c in so.kv_cache_block_copies:
            if not (0 <= c.src_block_id < lim.num_blocks and 0 <= c.dst_block_id < lim.num_blocks):
                raise WireError(f"{w}.kv_cache_block_copies has {c.src_block_id}->{c.dst_block_id}, outside "
                                f"[0, {lim.num_blocks})")
    ncp = so.num_common_prefix_blocks
    if ncp:
        if len(ncp) != lim.kv_groups:
            raise WireError(f"{w}.num_common_prefix_blocks has {len(ncp)} entries for {lim.kv_groups} groups")
        _span(ncp, 0, lim.max_blocks_per_req + 1, f"{w}.num_common_prefix_blocks")
    for name in ("finished_req_ids", "preempted_req_ids"):
        ids = getattr(so, name) or ()
        if any(not r or len(r) > MAX_REQ_ID_LEN for r in ids):
            raise WireError(f"{w}.{name}: request ids must be 1..{MAX_REQ_ID_LEN} characters")


def check_hidden_states(hidden: Any, so: SchedulerOutput, lim: Any) -> None:
    """The intermediate tensors a stage receives: exactly ``lim.hidden_names`` (LlamaModel's
    ``hidden_states`` and ``residual``), each of shape (rows, hidden_size) in the session's dtype,
    with rows = total_num_scheduled_tokens (up to ``max_row_padding`` more for a padded sender).
    An empty step carries none (None or an empty map)."""
    total = so.total_num_scheduled_tokens
    if total == 0:
        if hidden:
            raise WireError("hidden states sent for a step with no scheduled tokens")
        return
    if not isinstance(hidden, dict):
        raise WireError(f"hidden states must be a map of {list(lim.hidden_names)}, got {type(hidden).__name__}")
    if set(hidden) != set(lim.hidden_names):
        raise WireError(f"hidden states carry {sorted(hidden)[:4]}, expected {list(lim.hidden_names)}")
    want_dtype = getattr(torch, lim.dtype, None)
    for name, t in hidden.items():
        if not isinstance(t, torch.Tensor):
            raise WireError(f"hidden[{name!r}] is not a tensor")
        if t.dim() != 2 or t.shape[1] != lim.hidden_size or not total <= t.shape[0] <= total + lim.max_row_padding:
            raise WireError(f"hidden[{name!r}] has shape {tuple(t.shape)}, expected ({total}, {lim.hidden_size})")
        if t.dtype != want_dtype:
            raise WireError(f"hidden[{name!r}] has dtype {str(t.dtype).removeprefix('torch.')}, the session uses "
                            f"{lim.dtype}")


def check_model_runner_output(out: ModelRunnerOutput, so: SchedulerOutput, lim: Any) -> None:
    """Check the last stage's result for step ``so`` (on the head, before vLLM's scheduler reads
    it): one entry per scheduled request (the model runner's batch order, which may differ from
    the scheduler's), req_id_to_index its inverse, sampled token ids in the vocabulary with at most
    1 + the request's speculative tokens each, logprob arrays of consistent shapes (rows = sampled
    positions, columns <= max_logprobs + 1), prompt logprobs only for requests of this step (and,
    for requests new in this step, only if they asked)."""
    w = "ModelRunnerOutput"
    nst = so.num_scheduled_tokens
    ids = out.req_ids
    if len(ids) != len(nst) or set(ids) != nst.keys():
        raise WireError(f"{w}.req_ids lists {len(ids)} requests, the step scheduled {len(nst)} (or other ids)")
    idx = out.req_id_to_index
    if len(idx) != len(ids) or any(idx.get(r) != i for i, r in enumerate(ids)):
        raise WireError(f"{w}.req_id_to_index does not match req_ids")
    sampled = out.sampled_token_ids
    if len(sampled) != len(ids):
        raise WireError(f"{w}.sampled_token_ids has {len(sampled)} entries for {len(ids)} requests")
    spec = so.scheduled_spec_decode_tokens
    vocab = lim.vocab_size
    positions = 0
    for i, toks in enumerate(sampled):
        cap = 1 + len(spec.get(ids[i], ()))
        if len(toks) > cap:
            raise WireError(f"{w}.sampled_token_ids[{i}] has {len(toks)} tokens, at most {cap} expected")
        _span(toks, 0, vocab, f"{w}.sampled_token_ids[{i}]")
        positions += len(toks)
    lp = out.logprobs
    if lp is not None:
        cu = lp.cu_num_generated_tokens
        rows = len(ids) if cu is None else None
        if cu is not None:
            if len(cu) != len(ids) + 1 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
                raise WireError(f"{w}.logprobs.cu_num_generated_tokens is not {len(ids) + 1} non-decreasing offsets from 0")
            rows = cu[-1]
            if rows > len(ids) * (1 + lim.max_spec_tokens):
                raise WireError(f"{w}.logprobs has {rows} rows for {len(ids)} requests")
        ltid, lps, ranks = lp.logprob_token_ids, lp.logprobs, lp.sampled_token_ranks
        if ltid.ndim != 2 or lps.shape != ltid.shape or ranks.shape != (ltid.shape[0],) or ltid.shape[0] != rows:
            raise WireError(f"{w}.logprobs arrays have shapes {ltid.shape}/{lps.shape}/{ranks.shape}, expected "
                            f"({rows}, k)/({rows}, k)/({rows},)")
        if not 1 <= ltid.shape[1] <= lim.max_logprobs + 1:
            raise WireError(f"{w}.logprobs has {ltid.shape[1]} columns, at most {lim.max_logprobs + 1} allowed")
        if ltid.dtype.kind not in "iu" or ranks.dtype.kind not in "iu" or lps.dtype.kind != "f":
            raise WireError(f"{w}.logprobs arrays have dtypes {ltid.dtype}/{lps.dtype}/{ranks.dtype}")
        if ltid.size and (int(ltid.min()) < 0 or int(ltid.max()) >= vocab):
            raise WireError(f"{w}.logprobs.logprob_token_ids holds ids outside [0, {vocab})")
        if ranks.size and int(ranks.min()) < 0:
            raise WireError(f"{w}.logprobs.sampled_token_ranks holds a negative rank")
    asked = {r.req_id: r.sampling_params is not None and r.sampling_params.prompt_logprobs is not None
             for r in so.scheduled_new_reqs}
    for r, t in out.prompt_logprobs_dict.items():
        where = f"{w}.prompt_logprobs_dict[{r!r}]"
        if r not in nst:
            raise WireError(f"{where}: the request was not scheduled in this step")
        if t is None:
            continue
        if asked.get(r) is False:
            raise WireError(f"{where}: the request did not ask for prompt logprobs")
        a, b, c = t.logprob_token_ids, t.logprobs, t.selected_token_ranks
        if a.dim() != 2 or b.shape != a.shape or c.dim() != 1 or c.shape[0] != a.shape[0] or a.shape[0] > nst[r]:
            raise WireError(f"{where} has shapes {tuple(a.shape)}/{tuple(b.shape)}/{tuple(c.shape)} for {nst[r]} "
                            "scheduled tokens")
        if not 1 <= a.shape[1] <= lim.max_logprobs + 1:
            raise WireError(f"{where} has {a.shape[1]} columns, at most {lim.max_logprobs + 1} allowed")
        if a.dtype.is_floating_point or c.dtype.is_floating_point or not b.dtype.is_floating_point:
            raise WireError(f"{where} has dtypes {a.dtype}/{b.dtype}/{c.dtype}")
        if a.numel() and (int(a.min()) < 0 or int(a.max()) >= vocab):
            raise WireError(f"{where} holds token ids outside [0, {vocab})")
    for r, t in out.prompt_token_id_logprobs_dict.items():
        if r not in nst or t.dim() > 2 or (t.dim() and t.shape[0] > nst[r]):
            raise WireError(f"{w}.prompt_token_id_logprobs_dict[{r!r}] does not fit the step")
    if out.pooler_output is not None:
        raise WireError(f"{w}.pooler_output is set: pooling is not served across stages")
    if out.num_nans_in_logits and not out.num_nans_in_logits.keys() <= nst.keys():
        raise WireError(f"{w}.num_nans_in_logits names requests not scheduled in this step")
    sm = out.sampling_masks
    if sm is not None:
        t = sm.token_ids
        if t.ndim != 1 or t.dtype.kind not in "iu" or (t.size and (int(t.min()) < 0 or int(t.max()) >= vocab)):
            raise WireError(f"{w}.sampling_masks.token_ids must be token ids")
        if sm.offsets is not None:
            o = sm.offsets
            if o.ndim != 1 or o.dtype.kind not in "iu" or (o.size and (int(o.min()) < 0 or int(o.max()) > t.size)) \
                    or (o.size > 1 and bool((np.diff(o) < 0).any())):
                raise WireError(f"{w}.sampling_masks.offsets must be non-decreasing offsets into token_ids")
        cu = sm.cu_num_generated_tokens
        if cu is not None and (len(cu) != len(ids) + 1 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:]))):
            raise WireError(f"{w}.sampling_masks.cu_num_generated_tokens is not {len(ids) + 1} offsets from 0")
