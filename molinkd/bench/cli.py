"""``molink bench`` flags (the parsing; :mod:`molinkd.bench.runner` does the work)."""

from __future__ import annotations

import argparse
from typing import Any


def _batches(v: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in v.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: expected batch sizes like 1,16,32") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{v!r}: batch sizes must be positive integers")
    return out


def _spans(v: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple(tuple(int(x) for x in part.split(":")) for part in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: expected spans like 0:17,17:30") from None
    if any(len(p) != 2 for p in out):
        raise argparse.ArgumentTypeError(f"{v!r}: expected spans like 0:17,17:30")
    return out  # type: ignore[return-value]


def _nonneg(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"{v!r}: must be >= 0")
    return x


def _positive(kind: type) -> Any:
    def parse(v: str) -> Any:
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not {'an integer' if kind is int else 'a number'}") from None
        if x <= 0:
            raise argparse.ArgumentTypeError(f"{v!r}: must be > 0")
        return x

    return parse


def add_parser(sub: Any) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench", help="measure an N-stage swarm against a single node, on this machine",
        description="Start a single-node daemon and an N-stage swarm of daemons on this machine (each "
                    "pinned to cores of its own), drive them with the same streamed-completion load, print "
                    "tokens/s, time to first token and time per output token, and stop every process.")
    b.add_argument("--stages", type=_positive(int), default=2, help="stages in the swarm (default 2)")
    b.add_argument("--batch", type=_batches, default=(1, 16), metavar="B[,B...]",
                   help="concurrent requests per measurement (default 1,16)")
    b.add_argument("--max-tokens", type=_positive(int), default=128, help="new tokens per request (default 128)")
    b.add_argument("--prompt-len", type=_positive(int), default=16, help="prompt tokens, roughly (default 16)")
    b.add_argument("--cores-per-peer", type=_positive(int), default=1,
                   help="cores of its own for each peer and for the single node (default 1)")
    b.add_argument("--rtt-ms", type=_nonneg, default=0.0,
                   help="round-trip delay added between consecutive stages by a user-space link; the swarm "
                        "is also measured through the link at 0 ms")
    b.add_argument("--rate-mbit", type=_positive(float), default=None, help="rate limit of that link (Mbit/s)")
    b.add_argument("--depth", type=_positive(int), default=None,
                   help="pipeline depth (micro-batches in flight) for the head; default: the head's choice")
    b.add_argument("--spans", type=_spans, default=None, metavar="S:E,...",
                   help="the stages' layer spans (default: an even split), e.g. 0:17,17:30")
    b.add_argument("--long-prompt", type=_positive(int), default=0, metavar="TOKENS",
                   help="also measure each batch while a prompt of about this many tokens arrives mid-decode: "
                        "the decoding requests' p99 gap between tokens, against the undisturbed one")
    b.add_argument("--no-baseline", action="store_true", help="skip the single-node measurement")
    b.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded model)")
    b.add_argument("--json", action="store_true", help="end with one JSON line holding the results")
    return b


def run_from_args(args: argparse.Namespace) -> int:
    from molinkd.bench.runner import BenchOptions, run

    o = BenchOptions(stages=args.stages, batches=args.batch, max_tokens=args.max_tokens, prompt_len=args.prompt_len,
                     cores_per_peer=args.cores_per_peer, rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit,
                     depth=args.depth, model=args.model, spans=args.spans, skip_baseline=args.no_baseline,
                     long_prompt=args.long_prompt)
    return run(o, as_json=args.json)
