"""How long the head waits for a step's result before it calls the pipeline hung (no I/O).

A fixed deadline must allow for the biggest prefill on the slowest machine (minutes), so it catches
a hung stage far too late. :class:`StepClock` learns, from the steps that came back, a round trip
``base + per_token * tokens`` and allows a step a multiple of what its size predicts, never less
than ``floor`` seconds. Until it has seen ``warmup`` steps it allows ``initial`` (the first steps
compile kernels and fill caches). The clock for a step starts when it was sent or when the step
before it came back, whichever is later (steps queue behind each other in the pipeline).
"""

from __future__ import annotations

import dataclasses

SMALL_STEP = 64  # steps with at most this many tokens measure the fixed part of a round trip


@dataclasses.dataclass
class StepClock:
    # seconds: never less. Decode steps on a loaded machine jitter: this floor once fired on a
    # healthy stage while a 2-core machine loaded several engines (a needless failover, nothing
    # lost). 3 s avoided that but made a hung stage cost its clients 3.4-8.7 s in a 30-minute
    # soak: the floor is what a hung stage costs before failover starts, and it must stay < 3 s
    floor: float = 2.0
    factor: float = 8.0  # times the predicted round trip
    initial: float = 120.0  # seconds allowed before ``warmup`` steps were measured
    warmup: int = 3
    alpha: float = 0.2  # weight of a new measurement
    base: float | None = None  # seconds: round trip of a small step
    per_token: float | None = None  # seconds per scheduled token beyond a small step
    seen: int = 0

    def observe(self, tokens: int, seconds: float) -> None:
        """A step of ``tokens`` scheduled tokens came back ``seconds`` after its clock started."""
        if seconds < 0 or tokens < 0:
            return
        self.seen += 1
        if tokens <= SMALL_STEP or self.base is None:
            self.base = seconds if self.base is None else self.base + self.alpha * (seconds - self.base)
        if tokens > SMALL_STEP:
            rate = max(seconds - (self.base or 0.0), 0.0) / tokens
            self.per_token = rate if self.per_token is None else self.per_token + self.alpha * (rate - self.per_token)

    def budget(self, tokens: int) -> float:
        """Seconds a step of ``tokens`` tokens may take before the pipeline counts as hung."""
        if self.seen < self.warmup or self.base is None:
            return self.initial
        predicted = self.base + (self.per_token if self.per_token is not None else self.base / SMALL_STEP) * tokens
        return min(max(self.floor, self.factor * predicted), self.initial)
