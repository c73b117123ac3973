"""Changes to vLLM's behaviour that this product needs, in one place (run inside engine processes).

- ``eager_logprob_ranks``: vLLM's sampler counts a token's rank for logprobs with a function
  compiled by ``torch.compile`` (inductor). On CPU the first request that asks for logprobs (or
  prompt logprobs: audits, the verifier) compiles it, 9 s on an idle 2-core machine and 20 s under
  load, and every request in the same steps waits; a new batch shape compiles again. The eager
  expression is the same arithmetic ((x >= v).sum(-1)); its temporary boolean tensor (batch x
  vocabulary) is small at CPU batch sizes.
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


def apply() -> None:
    eager_logprob_ranks()
