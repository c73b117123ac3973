"""molinkd.limits: profiles are sane, session limits derive from a vLLM config, and the per-session
stage profile admits a full honest micro-batch but not twice that."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import pytest

from molinkd.limits import PROFILES, STAGE_MSG, MsgLimits, SessionLimits, session_limits, stage_msg_limits
from p2p.framing import FrameError, decode_payload


def fake_config(**kw):
    mc = SimpleNamespace(max_model_len=2048, dtype="torch.bfloat16", max_logprobs=20,
                         get_vocab_size=lambda: 49152, get_hidden_size=lambda: 576)
    return SimpleNamespace(model_config=mc, scheduler_config=SimpleNamespace(max_num_seqs=32, max_num_batched_tokens=2048),
                           cache_config=SimpleNamespace(block_size=16), speculative_config=None, **kw)


def test_profiles_are_ordered_and_valid():
    assert set(PROFILES) == {"stage", "generate", "generate-reply", "control", "record"}
    for p in PROFILES.values():
        assert p.max_bin_len <= p.max_frame and p.max_depth >= 4
    assert PROFILES["control"].max_frame < PROFILES["generate"].max_frame < PROFILES["stage"].max_frame


def test_a_whole_non_streamed_completion_with_logprobs_fits_the_reply_profile():
    from molinkd.limits import GENERATE_MSG, GENERATE_REPLY_MSG

    n = 32_768  # a long context's worth of tokens, 20 top logprobs each
    rows = [[[40000 + j, -1.2345678, j + 1, " tok"] for j in range(21)] for _ in range(n)]
    ev = {"ev": "delta", "index": 0, "text": " tok" * n, "token_ids": [40000] * n, "logprobs": rows,
          "finish_reason": "length"}
    payload = msgpack.packb({"v": 1, "t": "gen.event", "b": ev})
    assert decode_payload(payload, GENERATE_REPLY_MSG).body["token_ids"][-1] == 40000
    with pytest.raises(FrameError):
        decode_payload(payload, GENERATE_MSG)
    with pytest.raises(ValueError):
        MsgLimits(name="x", max_frame=0, max_bin_len=1, max_str_len=1, max_array_len=1, max_map_len=1, max_depth=1,
                  max_elements=1)


def test_session_limits_from_a_vllm_config():
    lim = session_limits(fake_config(), 700)
    assert (lim.num_blocks, lim.block_size, lim.vocab_size, lim.hidden_size, lim.dtype) == (700, 16, 49152, 576, "bfloat16")
    assert lim.max_blocks_per_req == 128 and lim.kv_groups == 1 and lim.hidden_names == ("hidden_states", "residual")
    with pytest.raises(ValueError, match="num_blocks"):
        session_limits(fake_config(), 0)
    with pytest.raises(ValueError, match="max_row_padding"):
        lim.replace(max_row_padding=-1)


def test_stage_profile_fits_an_honest_micro_batch_only():
    lim = session_limits(fake_config(), 700)
    prof = stage_msg_limits(lim)
    assert prof.max_frame < STAGE_MSG.max_frame
    rows = lim.max_num_batched_tokens
    hidden = {n: {"dtype": "bfloat16", "shape": [rows, 576], "data": b"\0" * (rows * 576 * 2)} for n in lim.hidden_names}
    prompts = [{"req_id": f"r{i}", "prompt_token_ids": [40000] * lim.max_model_len} for i in range(lim.max_num_seqs)]
    body = {"step": 1, "sched": {"scheduled_new_reqs": prompts}, "hidden": hidden}
    payload = msgpack.packb({"v": 1, "t": "eng.step", "b": body})
    assert decode_payload(payload, prof).type == "eng.step"
    body["hidden"]["hidden_states"]["data"] *= 2  # twice the rows a micro-batch (or a prompt) can have
    with pytest.raises(FrameError, match="binary of"):
        decode_payload(msgpack.packb({"v": 1, "t": "eng.step", "b": body}), prof)
    too_many = {"sched": {"scheduled_new_reqs": prompts * 5}}  # 5 full contexts per slot
    with pytest.raises(FrameError, match="values|bytes"):
        decode_payload(msgpack.packb({"v": 1, "t": "eng.step", "b": too_many}), prof)


def test_session_limits_are_frozen():
    lim = SessionLimits(num_blocks=1, block_size=16, max_num_seqs=1, max_num_batched_tokens=1, max_model_len=16,
                        vocab_size=10, hidden_size=4, dtype="float32")
    with pytest.raises(AttributeError):
        lim.num_blocks = 5  # type: ignore[misc]
