"""Cost of the hostile-peer checks on the hot path, per pipeline step (microseconds), with timeit.

Realistic steps of the embedded model (SmolLM2: vocab 49152, hidden 576, bf16; block size 16,
max_model_len 2048, a few hundred KV blocks): decode steps at batch 16 and 32 (one token per
request, contexts of ~300-1000 tokens, every 16th request taking a new block) and a prefill step
admitting 16 requests of 128 tokens. For each: the bounded frame decode (scan + msgpack) against
plain msgpack, the scheduler-output decode, ``check_scheduler_output``, ``check_hidden_states`` and
``check_model_runner_output``. Pure CPU, no engine, no lock needed.

usage: python benchmarks/bench_checks.py [--number 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from molinkd.engine import schedwire, wire  # noqa: E402
from molinkd.limits import STAGE_MSG, SessionLimits, stage_msg_limits  # noqa: E402
from p2p.framing import HEADER, decode_payload, encode_frame  # noqa: E402
from p2p.tensors import from_wire, to_wire  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402

LIM = SessionLimits(num_blocks=600, block_size=16, max_num_seqs=64, max_num_batched_tokens=8192,
                    max_model_len=2048, vocab_size=49152, hidden_size=576, dtype="bfloat16")


def decode_step(batch: int, rng: random.Random) -> SchedulerOutput:
    ids = [f"cmpl-{rng.getrandbits(64):016x}-0" for _ in range(batch)]
    ctx = [rng.randrange(300, 1000) for _ in range(batch)]
    return SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=CachedRequestData(
            req_ids=ids, resumed_req_ids=set(), new_token_ids=[[rng.randrange(49152)] for _ in ids],
            all_token_ids={}, new_block_ids=[([rng.randrange(600)],) if i % 16 == 0 else None for i in range(batch)],
            num_computed_tokens=ctx, num_output_tokens=[c - 128 for c in ctx],
        ),
        num_scheduled_tokens={r: 1 for r in ids},
        total_num_scheduled_tokens=batch,
        scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )


def prefill_step(batch: int, prompt: int, rng: random.Random) -> SchedulerOutput:
    sp = SamplingParams(temperature=0.7, max_tokens=128)
    sp.update_from_generation_config({}, eos_token_id=2)
    reqs = [NewRequestData(req_id=f"cmpl-{i}", prompt_token_ids=[rng.randrange(49152) for _ in range(prompt)],
                           mm_features=[], sampling_params=sp, pooling_params=None,
                           block_ids=(list(range(i * 8, i * 8 + 8)),), num_computed_tokens=0, lora_request=None)
            for i in range(batch)]
    return SchedulerOutput(
        scheduled_new_reqs=reqs, scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={r.req_id: prompt for r in reqs}, total_num_scheduled_tokens=batch * prompt,
        scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )


def us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def measure(name: str, so: SchedulerOutput, number: int) -> dict:
    total = so.total_num_scheduled_tokens
    hidden = {n: torch.zeros(total, LIM.hidden_size, dtype=torch.bfloat16) for n in LIM.hidden_names}
    body = {"step": 7, "sched": schedwire.encode_scheduler_output(so), "grammar": None, "sample": True,
            "hidden": {k: to_wire(v) for k, v in hidden.items()}, "timings": [["peer", 1.0]]}
    payload = encode_frame(wire.STEP, body)[HEADER.size:]
    decoded = decode_payload(payload, STAGE_MSG)
    so2 = schedwire.decode_scheduler_output(decoded.body["sched"])
    h2 = {k: from_wire(v) for k, v in decoded.body["hidden"].items()}
    ids = list(so.num_scheduled_tokens)
    out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                            sampled_token_ids=[[5] for _ in ids])
    session_profile = stage_msg_limits(LIM)
    n = max(number // (1 + total // 64), 20)
    row = {
        "step": name,
        "frame_bytes": len(payload),
        "msgpack_unpackb_us": us(lambda: msgpack.unpackb(payload, raw=False), n),
        "bounded_decode_payload_us": us(lambda: decode_payload(payload, session_profile), n),
        "decode_scheduler_output_us": us(lambda: schedwire.decode_scheduler_output(decoded.body["sched"]), n),
        "check_step_body_us": us(lambda: wire.check_step_body(decoded.body, 3), n),
        "check_scheduler_output_us": us(lambda: schedwire.check_scheduler_output(so2, LIM), n),
        "check_hidden_states_us": us(lambda: schedwire.check_hidden_states(h2, so2, LIM), n),
        "check_model_runner_output_us": us(lambda: schedwire.check_model_runner_output(out, so2, LIM), n),
    }
    row["scan_overhead_us"] = row["bounded_decode_payload_us"] - row["msgpack_unpackb_us"]
    row["all_checks_us"] = (row["scan_overhead_us"] + row["check_step_body_us"] + row["check_scheduler_output_us"]
                            + row["check_hidden_states_us"] + row["check_model_runner_output_us"])
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=2000)
    a = p.parse_args()
    rng = random.Random(0)
    rows = [
        measure("decode b16", decode_step(16, rng), a.number),
        measure("decode b32", decode_step(32, rng), a.number),
        measure("prefill 16x128", prefill_step(16, 128, rng), a.number),
    ]
    for r in rows:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
