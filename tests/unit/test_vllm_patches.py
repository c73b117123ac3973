"""vLLM behaviour changed in engine processes (molinkd/engine/vllm_patches.py)."""

from __future__ import annotations

import torch


def test_logprob_ranks_are_counted_eagerly_with_the_same_result():
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than as compiled

    from molinkd.engine import vllm_patches

    vllm_patches.apply()
    vllm_patches.apply()  # idempotent
    assert sampler.batched_count_greater_than is vllm_patches._count_greater_than
    x = torch.log_softmax(torch.randn(5, 300, generator=torch.Generator().manual_seed(1)), dim=-1)
    v = x[:, 7:8]  # the logprob of token 7 in each row
    got = sampler.batched_count_greater_than(x, v)
    assert got.tolist() == [int((row >= row[7]).sum()) for row in x]
    assert torch.equal(got, compiled(x, v))  # vLLM's compiled kernel agrees (compiled once, here)
