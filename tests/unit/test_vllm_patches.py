"""vLLM behaviour changed in engine processes (molinkd/engine/vllm_patches.py)."""

from __future__ import annotations

import pytest
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



def test_a_cpu_generator_is_rewound_to_its_state_before_the_discarded_sample():
    """vLLM's bookkeeping after a partial prefill, with CPU generators: the token sampled for the
    discarded request is thrown away and its generator rewound, so its next draw repeats the
    discarded one (on CUDA by Philox offset; here by the saved state); the others move on."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from molinkd.engine import vllm_patches

    vllm_patches.apply()
    vllm_patches.apply()  # idempotent: wrapped once
    assert GPUModelRunner._molink_rewind
    assert GPUModelRunner._sample.__qualname__.startswith("rewinding")
    seeded, other = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    runner = SimpleNamespace(input_batch=SimpleNamespace(num_reqs=3, generators={0: seeded, 2: other}),
                             discard_request_mask=SimpleNamespace(np=np.array([True, True, False])))
    drawn = {}

    def sample(self):  # vLLM's sampler: one draw from each seeded request's generator
        drawn.update({i: torch.rand(4, generator=g) for i, g in self.input_batch.generators.items()})

    def bookkeeping(self):  # vLLM's loop over the discarded requests, as in gpu_model_runner.py
        for i in np.nonzero(self.discard_request_mask.np[:self.input_batch.num_reqs])[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)

    with pytest.raises(RuntimeError, match="offset"):  # what vLLM does on CPU unpatched
        seeded.set_offset(seeded.get_offset() - 4)
    _sample, _bookkeeping = vllm_patches.rewinding(sample, bookkeeping)
    _sample(runner)
    _bookkeeping(runner)
    assert runner.input_batch.generators == {0: seeded, 2: other}  # the real generators are back
    assert torch.equal(torch.rand(4, generator=seeded), drawn[0])  # rewound: the same draw again
    assert not torch.equal(torch.rand(4, generator=other), drawn[2])  # kept its token: moved on
