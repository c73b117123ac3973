"""PURE: what a head believes about a stage's speed: measured, not announced.

Any peer can announce any throughput, and a peer that announces a tempting one attracts routes.
So a head plans with what it measured itself (the per-step compute times its route reports and its
own round trips), and with a capped figure for peers it has not measured yet; a peer whose
announcement is far above what the head measured is a liar: it is banned from this head's routes
and its records are ignored for that time.

What this catches: a peer that announces more speed than it has (the cheap way to attract traffic).
What it does not: a peer that computes wrong hidden states at an honest speed (audits recompute some
of its steps elsewhere: :mod:`molinkd.audit`), and a peer that lies in its own per-step timings only (the head's
round trip bounds those: a stage can claim less compute than it took, not less than the round trip).
"""

from __future__ import annotations

import dataclasses
import math

# an unmeasured peer is planned with at most this (tokens/s at batch 1): announcing more buys nothing
UNMEASURED_CAP = 50.0
# announced / measured throughput above this, over enough steps, is a lie (an honest stage's
# announcement is a batch-1 figure; measured steps at batch 32 are slower, hence the wide margin)
LIE_FACTOR = 20.0
MIN_STEPS = 20


@dataclasses.dataclass(frozen=True, slots=True)
class Measured:
    step_ms: float  # moving average of the peer's compute per step, as the route reported it
    steps: int  # how many steps the average covers (the route's count)


def measured_from_stats(stats: dict, peer: str) -> Measured | None:
    """The head executor's pipeline stats (``stage_ms`` per peer, ``steps``) -> one peer's figure."""
    ms = (stats.get("stage_ms") or {}).get(peer)
    steps = stats.get("steps") or 0
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms) or ms <= 0:
        return None
    return Measured(step_ms=float(ms), steps=int(steps) if isinstance(steps, int) else 0)


def planning_throughput(announced: float, measured: Measured | None) -> float:
    """Tokens/s to plan a route with: the measured rate when there is one, else the announcement
    capped at :data:`UNMEASURED_CAP`."""
    if measured is not None and measured.steps > 0:
        return 1000.0 / measured.step_ms
    if not math.isfinite(announced) or announced <= 0:
        return 1e-3
    return min(announced, UNMEASURED_CAP)


def lie(announced: float, measured: Measured | None) -> str | None:
    """Why ``announced`` is not believable given ``measured`` (None if it is, or if too little is
    known yet)."""
    if measured is None or measured.steps < MIN_STEPS:
        return None
    real = 1000.0 / measured.step_ms
    if announced > LIE_FACTOR * max(real, UNMEASURED_CAP):
        return (f"announces {announced:.0f} tokens/s but measured {real:.1f} tokens/s "
                f"({measured.step_ms:.1f} ms per step over {measured.steps} steps)")
    return None
