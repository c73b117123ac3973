"""Prefill pacing: how many prompt tokens one pipeline step may carry while other requests decode
(pure logic; the head's executor feeds it, its scheduler reads it).

A long prompt prefilled in big chunks holds every stage, and the links, for the chunk's compute
and transfer time, and each decoding request waits that long for its next token: a 2048-token
prompt in two chunks of 1024 stalls 16 decoding requests for seconds. As in the MoLink paper,
prompts are cut into small chunks while requests decode, so decode steps keep their cadence.

:class:`PrefillPacer` learns from the steps that come back (the head measures each step from its
send, or from the previous result, to its result):

- ``step_s``: the time a decode-only step takes; a decoding request gets its next token every
  ``depth * step_s`` seconds (one step of each micro-batch per cycle);
- ``per_token_s``: the time one prompt token adds to a step (compute on every stage, bytes on
  every link).

Every step of the pipeline carries a chunk while a prompt is prefilled (vLLM schedules the next
chunk of a prompt while the previous one is in flight), so a chunk of ``c`` tokens stretches each
step by ``per_token_s * c`` and each decoding request's wait by ``depth`` times that. The pacer
keeps that stretch within ``slack`` of the cadence: ``c <= slack * step_s / per_token_s``, never
below ``floor`` (a prompt must progress). Until a prompt token's cost is measured it is taken
as ``step_s / ASSUMED_STEP_TOKENS`` (a step of that many prompt tokens would double a step).

With nothing decoding a prompt is chunked for time to first token instead
(:func:`molinkd.engine.microbatch.prefill_chunk`).
"""

from __future__ import annotations

import dataclasses

SLACK_ENV = "MOLINK_PREFILL_SLACK"  # developer override (benchmarks); 0 turns pacing off
DEFAULT_SLACK = 0.5
ASSUMED_STEP_TOKENS = 64


@dataclasses.dataclass
class PrefillPacer:
    slack: float = DEFAULT_SLACK  # a decoding request may wait this much longer than its cadence
    floor: int = 16  # prompt tokens per step at least
    alpha: float = 0.2  # weight of a new measurement
    step_s: float | None = None  # seconds a decode-only step takes
    per_token_s: float | None = None  # seconds one prompt token adds to a step

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        """A step that carried ``prompt_tokens`` prompt tokens (0: decode only) took ``seconds``."""
        if seconds < 0 or prompt_tokens < 0:
            return
        if prompt_tokens == 0:
            self.step_s = seconds if self.step_s is None else self.step_s + self.alpha * (seconds - self.step_s)
        elif self.step_s is not None:
            rate = max(seconds - self.step_s, 0.0) / prompt_tokens
            self.per_token_s = rate if self.per_token_s is None else \
                self.per_token_s + self.alpha * (rate - self.per_token_s)

    def chunk(self) -> int | None:
        """Prompt tokens one step may carry while requests decode; None: no cap (pacing off, or
        no decode step measured yet)."""
        if self.slack <= 0 or not self.step_s:
            return None
        per = self.per_token_s or self.step_s / ASSUMED_STEP_TOKENS
        if per <= 0:
            return None
        return max(self.floor, int(self.slack * self.step_s / per))


def slack_from_env(default: float = DEFAULT_SLACK) -> float:
    from molinkd.config import number_from_env

    return float(number_from_env(SLACK_ENV, float, 0.0, default, "a number >= 0 (0 turns prefill pacing off)"))


def prompt_tokens_of(num_scheduled_tokens: dict[str, int]) -> int:
    """Prompt tokens of a step: the tokens of requests scheduled for more than one token (a
    decoding request gets one per step: no speculative decoding on a pipeline)."""
    return sum(n for n in num_scheduled_tokens.values() if n > 1)


# One engine per EngineCore process: its PipelineExecutor feeds this pacer with every step it
# gets back and its MicroBatchScheduler reads it (they are built apart by vLLM and share nothing else).
shared = PrefillPacer()
