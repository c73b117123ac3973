"""Changes to vLLM's behaviour that this product needs, in one place (run inside engine processes).

- ``eager_logprob_ranks``: vLLM's sampler counts a token's rank for logprobs with a function
  compiled by ``torch.compile`` (inductor). On CPU the first request that asks for logprobs (or
  prompt logprobs: audits, the verifier) compiles it, 9 s on an idle 2-core machine and 20 s under
  load, and every request in the same steps waits; a new batch shape compiles again. The eager
  expression is the same arithmetic ((x >= v).sum(-1)); its temporary boolean tensor (batch x
  vocabulary) is small at CPU batch sizes.
- ``cpu_generator_rewind``: after a step that prefilled only part of a prompt, vLLM throws away
  the token it sampled for that request and rewinds the request's seeded generator with
  ``set_offset(get_offset() - 4)``, which only CUDA's Philox generators have: on CPU the step
  fails ("CPU Generator does not use offset"). A pipeline head cuts prompts into chunks (for time
  to first token, and to pace prefill while others decode), so every seeded request with a long
  prompt hit it on the last stage. On CPU the generator's state is saved before sampling and put
  back instead, which is what the rewind means: the next sample draws the same numbers.
"""

from __future__ import annotations

import torch


def _count_greater_than(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return (x >= values).sum(-1)


def eager_logprob_ranks() -> None:
    """On CPU, replace the sampler's compiled rank count with the eager one (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import sampler

    sampler.batched_count_greater_than = _count_greater_than


class _Rewind:
    """Stands in for a CPU generator during vLLM's bookkeeping: its "rewind by one sample"
    restores the state saved before sampling."""

    def __init__(self, gen: torch.Generator, state: torch.Tensor) -> None:
        self.gen, self.state = gen, state

    def get_offset(self) -> int:
        return 4

    def set_offset(self, offset: int) -> None:
        self.gen.set_state(self.state)


def _discarded_generators(runner) -> dict[int, torch.Generator]:
    """Seeded generators of the requests whose sampled token this step throws away (partial
    prefills), by batch index."""
    import numpy as np

    n = runner.input_batch.num_reqs
    gens = runner.input_batch.generators
    return {int(i): gens[int(i)] for i in np.nonzero(runner.discard_request_mask.np[:n])[0] if int(i) in gens}


def rewinding(sample, bookkeeping):
    """vLLM model runner's ``_sample`` and ``_bookkeeping_sync``, changed so that the rewind of a
    discarded request's generator restores the state it had before sampling."""

    def _sample(self, *args, **kwargs):
        self._molink_saved = {i: (g, g.get_state()) for i, g in _discarded_generators(self).items()}
        return sample(self, *args, **kwargs)

    def _bookkeeping_sync(self, *args, **kwargs):
        saved, self._molink_saved = getattr(self, "_molink_saved", None) or {}, None
        gens = self.input_batch.generators
        swapped = {i: g for i, (g, state) in saved.items() if gens.get(i) is g}
        for i, g in swapped.items():
            gens[i] = _Rewind(g, saved[i][1])
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, g in swapped.items():
                if isinstance(gens.get(i), _Rewind):
                    gens[i] = g

    return _sample, _bookkeeping_sync


def cpu_generator_rewind() -> None:
    """On CPU, make vLLM's rewind of a seeded generator after a partial prefill work (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_molink_rewind", False):
        return
    GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync = rewinding(
        GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync)
    GPUModelRunner._molink_rewind = True


def apply() -> None:
    eager_logprob_ranks()
    cpu_generator_rewind()
