"""Layer spans: parsing, validation, the fake pipeline rank vLLM needs, and automatic span choice.

PURE: no I/O, no vLLM import. A span is a half-open interval ``[start, end)`` of transformer layers.

Text forms accepted by :func:`parse_span`:

- ``"S:E"``      half-open, e.g. ``"0:15"`` (this project's form);
- ``"A,B"``      the MoLink reference's inclusive form (``--serving_layers 0,14`` == ``"0:15"``);
- ``"all"``      ``[0, L)``;
- ``"none"``     no layers (a relay/client-only peer): returns None;
- ``"auto"``     chosen later by :func:`choose_span` from the swarm's peer table: returns
  the string ``"auto"``.

vLLM mapping (design.md section 4): vLLM only knows "pipeline rank r of size n" plus the env
``VLLM_PP_LAYER_PARTITION``. A span ``[s, e)`` of ``L`` layers becomes:

- ``s == 0``        -> rank 0 of 2, partition ``"e,L-e"`` (owns embeddings, not the head);
- ``e == L``        -> rank 1 of 2, partition ``"s,L-s"`` (owns final norm + lm head);
- otherwise        -> rank 1 of 3, partition ``"s,e-s,L-e"``;
- ``[0, L)``        -> rank 0 of 1, no partition (plain single-node vLLM).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Literal

from p2p.records import runs


class SpanError(ValueError):
    """A span is malformed or does not fit the model (local misuse: fix the argument)."""


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Span:
    start: int
    end: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.end, int)):
            raise SpanError(f"span bounds must be ints, got {self.start!r}:{self.end!r}")
        if self.start < 0 or self.end <= self.start:
            raise SpanError(f"span {self.start}:{self.end} is empty or negative; use S:E with 0 <= S < E")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    def validate(self, num_layers: int) -> Span:
        """Return self if it fits a model of ``num_layers`` layers, else raise SpanError."""
        if self.end > num_layers:
            raise SpanError(
                f"span {self} exceeds the model's {num_layers} layers; the last valid end is {num_layers}"
            )
        return self

    def is_full(self, num_layers: int) -> bool:
        return self.start == 0 and self.end == num_layers


def parse_span(text: str, num_layers: int | None = None) -> Span | None | Literal["auto"]:
    """Parse a span given on the command line / in config.

    Returns a :class:`Span`, None for ``"none"``, or ``"auto"``. With ``num_layers`` the span is
    validated against the model (and ``"all"`` resolved); without it ``"all"`` raises SpanError.
    """
    if not isinstance(text, str):
        raise SpanError(f"span must be a string, got {type(text).__name__}")
    t = text.strip().lower()
    if t == "auto":
        return "auto"
    if t == "none":
        return None
    if t == "all":
        if num_layers is None:
            raise SpanError("'all' needs the model's layer count")
        return Span(0, num_layers)
    try:
        if ":" in t:
            a, b = t.split(":", 1)
            span = Span(int(a), int(b))
        elif "," in t:
            a, b = t.split(",", 1)
            first, last = int(a), int(b)
            if last < first:
                raise SpanError(f"inclusive span {text!r} has its last layer before its first")
            span = Span(first, last + 1)
        else:
            raise SpanError(f"cannot parse span {text!r}: use S:E (half-open), A,B (inclusive), all, auto or none")
    except ValueError as e:
        if isinstance(e, SpanError):
            raise
        raise SpanError(f"cannot parse span {text!r}: bounds must be integers ({e})") from None
    if num_layers is not None:
        span.validate(num_layers)
    return span


@dataclasses.dataclass(frozen=True, slots=True)
class PipelinePlacement:
    """What to tell vLLM so that it builds exactly the layers of one span."""

    rank: int
    size: int
    partition: str | None  # value for VLLM_PP_LAYER_PARTITION, None when size == 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def env(self) -> dict[str, str]:
        return {"VLLM_PP_LAYER_PARTITION": self.partition} if self.partition else {}


def pipeline_placement(span: Span, num_layers: int) -> PipelinePlacement:
    """Map ``span`` of a ``num_layers`` model to vLLM's fake pipeline rank/size + partition."""
    span.validate(num_layers)
    s, e, n = span.start, span.end, num_layers
    if s == 0 and e == n:
        return PipelinePlacement(0, 1, None)
    if s == 0:
        return PipelinePlacement(0, 2, f"{e},{n - e}")
    if e == n:
        return PipelinePlacement(1, 2, f"{s},{n - s}")
    return PipelinePlacement(1, 3, f"{s},{e - s},{n - e}")


def check_chain(spans: Sequence[Span], num_layers: int) -> None:
    """Raise SpanError unless ``spans`` tile ``[0, num_layers)`` exactly, in order."""
    if not spans:
        raise SpanError("empty chain")
    pos = 0
    for i, sp in enumerate(spans):
        if sp.start != pos:
            raise SpanError(f"chain stage {i} starts at layer {sp.start}, expected {pos} (gap or overlap)")
        pos = sp.end
    if pos != num_layers:
        raise SpanError(f"chain ends at layer {pos}, the model has {num_layers}")


def even_split(num_layers: int, parts: int) -> list[Span]:
    """Split ``[0, L)`` into ``parts`` contiguous spans, sizes differing by at most one."""
    if not 1 <= parts <= num_layers:
        raise SpanError(f"cannot split {num_layers} layers into {parts} parts")
    base, extra = divmod(num_layers, parts)
    return _tile([base + (1 if i < extra else 0) for i in range(parts)])


def _tile(sizes: Sequence[int]) -> list[Span]:
    """Contiguous spans from layer 0 with these sizes."""
    out, pos = [], 0
    for size in sizes:
        out.append(Span(pos, pos + size))
        pos += size
    return out


def balanced_split(spans: Sequence[tuple[int, int]], step_ms: Sequence[float]) -> list[Span]:
    """Spans with the same layers and stages, sized so that the stages' measured step times
    would be equal: each stage's cost per layer is taken from its measured step (``step_ms[i]``
    over its span's layers; this charges a stage's extra work, the head's scheduling and API or
    the last stage's logits, to its layers), and the layers are dealt out to minimise the
    slowest stage. Every stage keeps at least one layer."""
    if len(spans) != len(step_ms) or not spans:
        raise SpanError("one measured step time per span is needed")
    check_chain([Span(s, e) for s, e in spans], spans[-1][1])
    if any(not (t > 0 and math.isfinite(t)) for t in step_ms):
        raise SpanError(f"step times must be positive: {list(step_ms)}")
    per_layer = [t / (e - s) for (s, e), t in zip(spans, step_ms)]
    num_layers, n = spans[-1][1], len(spans)
    sizes = [1] * n
    for _ in range(num_layers - n):  # each next layer to the stage that stays fastest with it
        i = min(range(n), key=lambda j: ((sizes[j] + 1) * per_layer[j], j))
        sizes[i] += 1
    return _tile(sizes)


# --- automatic span choice (Petals' block_selection, adapted) -------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServedSpan:
    """One peer's announced span, as seen in a peer-table snapshot."""

    peer_id: str
    start: int
    end: int
    throughput: float  # tokens/s this peer can push through its whole span (>0)


def coverage(table: Iterable[ServedSpan], num_layers: int) -> list[float]:
    """Per-layer throughput: the sum of throughputs of the peers serving each layer."""
    tp = [0.0] * num_layers
    for p in table:
        for layer in range(max(p.start, 0), min(p.end, num_layers)):
            tp[layer] += max(p.throughput, 0.0)
    return tp


def span_length_for(
    num_layers: int,
    *,
    free_memory_bytes: int | None = None,
    bytes_per_layer: int | None = None,
    max_layers: int | None = None,
) -> int:
    """How many layers this peer should take: what fits in memory, capped by ``max_layers``."""
    n = num_layers
    if free_memory_bytes is not None and bytes_per_layer:
        n = min(n, free_memory_bytes // bytes_per_layer)
    if max_layers is not None:
        n = min(n, max_layers)
    if n < 1:
        raise SpanError("not enough free memory for even one layer; serve with --layers none")
    return int(n)


def choose_span(
    table: Iterable[ServedSpan],
    num_layers: int,
    length: int,
    *,
    exclude_peer: str | None = None,
) -> Span:
    """Pick the span of ``length`` layers that helps the swarm most.

    1. If some layers are served by nobody, cover the largest gap: the window of ``length``
       layers that covers the most uncovered layers (ties: the earliest window of the largest gap).
    2. Otherwise strengthen the weakest part: the window whose bottleneck (minimum per-layer
       throughput) is lowest, ties broken by lowest mean throughput, then earliest start.

    ``exclude_peer`` drops this peer's own old announcement (when re-choosing).
    """
    if not 1 <= length:
        raise SpanError("span length must be >= 1")
    length = min(length, num_layers)
    rows = [p for p in table if p.peer_id != exclude_peer]
    tp = coverage(rows, num_layers)
    windows = range(0, num_layers - length + 1)

    gaps = runs(tp, lambda v: v == 0.0)
    if gaps:
        g_start, g_end = max(gaps, key=lambda g: (g[1] - g[0], -g[0]))
        g_len = g_end - g_start
        if g_len >= length:
            return Span(g_start, g_start + length)
        # the gap is shorter than our span: centre-cover it, preferring windows that cover the
        # most uncovered layers overall, then the weakest neighbours
        best = max(
            windows,
            key=lambda w: (
                sum(1 for i in range(w, w + length) if tp[i] == 0.0),
                g_start >= w and g_end <= w + length,
                -sum(tp[w : w + length]),
                -w,
            ),
        )
        return Span(best, best + length)

    best = min(
        windows,
        key=lambda w: (min(tp[w : w + length]), sum(tp[w : w + length]) / length, w),
    )
    return Span(best, best + length)


def swarm_bottleneck(table: Iterable[ServedSpan], num_layers: int) -> float:
    """The swarm's throughput bound: the weakest layer's total throughput (0 if a gap exists)."""
    tp = coverage(table, num_layers)
    return min(tp) if tp else 0.0


def should_rebalance(
    table: Sequence[ServedSpan],
    num_layers: int,
    my_peer_id: str,
    *,
    min_gain: float = 1.2,
) -> Span | None:
    """If moving this peer's span would raise the swarm bottleneck by ``min_gain``x, return
    the new span, else None (Petals' should_choose_other_blocks, simplified)."""
    mine = [p for p in table if p.peer_id == my_peer_id]
    if not mine:
        return None
    me = mine[0]
    others = [p for p in table if p.peer_id != my_peer_id]
    current = swarm_bottleneck(table, num_layers)
    new = choose_span(others, num_layers, me.end - me.start)
    moved = [*others, ServedSpan(my_peer_id, new.start, new.end, me.throughput)]
    after = swarm_bottleneck(moved, num_layers)
    if (new.start, new.end) == (me.start, me.end):
        return None
    if current == 0.0:
        return new if after > 0.0 else None
    return new if after >= current * min_gain and not math.isclose(after, current) else None
