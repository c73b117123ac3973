"""The one load generator every setup is measured with: ``batch`` concurrent streamed
completions (``ignore_eos``, greedy) against a peer's OpenAI API, timed per token as they arrive.

``run_batch`` returns a :class:`BatchResult`: output tokens/s over the wall time of the whole
batch, time to first token and time per output token of each request. With ``long_prompt`` it
also sends one prompt of that many tokens once every request of the batch is decoding, and
reports the gaps between tokens the decoding requests saw while that prompt was prefilled
(:func:`gaps_during`): prefill must not stall decode. Pure summaries
(percentiles, prompts) are separate from the HTTP edge so they can be tested without sockets.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx
import trio


class LoadError(RuntimeError):
    """A benchmark request failed; the message says which and why."""


def make_prompt(i: int, prompt_len: int) -> str:
    """A prompt of roughly ``prompt_len`` tokens, distinct per request from its first token (so no
    prefix is shared between requests). Common English words are one token each in Llama-family
    tokenizers; the exact count is reported from the server's usage."""
    words = ("the", "river", "city", "light", "stone", "garden", "music", "winter")
    head = f"Story {i}:"
    body = " ".join(words[(i + k) % len(words)] for k in range(max(0, prompt_len - 4)))
    return f"{head} {body}".strip()


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk's tokens
    tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.tokens < 2 or not self.token_times:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.tokens - 1)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def gaps_during(requests: list[RequestTiming], start: float, end: float) -> list[float]:
    """Gaps between consecutive tokens of ``requests`` whose interval overlaps [start, end]: what
    a decoding client waited while something else (a long prefill) ran."""
    out = []
    for r in requests:
        for a, b in zip(r.token_times, r.token_times[1:]):
            if b >= start and a <= end:
                out.append(b - a)
    return out


@dataclass
class BatchResult:
    batch: int
    wall_s: float
    requests: list[RequestTiming]
    long: RequestTiming | None = None  # the long prompt sent while the batch decoded, if any

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        ttft = [r.ttft * 1000 for r in self.requests if r.ttft is not None]
        tpot = [r.tpot * 1000 for r in self.requests if r.tpot is not None]
        gaps = [g * 1000 for r in self.requests for g in r.gaps()]
        prompt = [r.prompt_tokens for r in self.requests if r.prompt_tokens]

        def rnd(x: float | None, n: int = 1) -> float | None:
            return None if x is None else round(x, n)

        out = {
            "batch": self.batch,
            "tok_s": rnd(self.tok_s, 2),
            "tokens": self.tokens,
            "wall_s": rnd(self.wall_s, 3),
            "ttft_ms_p50": rnd(percentile(ttft, 50)),
            "tpot_ms_p50": rnd(percentile(tpot, 50), 2),
            "gap_ms_p99": rnd(percentile(gaps, 99), 1),
            "prompt_tokens": round(sum(prompt) / len(prompt)) if prompt else None,
        }
        if self.long is not None and self.long.ttft is not None:
            # the decoders' gaps while the long prompt was prefilled (sent .. its first token)
            during = [g * 1000 for g in gaps_during(self.requests, self.long.start, self.long.token_times[0])]
            out.update({"long_prompt_tokens": self.long.prompt_tokens, "long_ttft_ms": rnd(self.long.ttft * 1000),
                        "long_gap_ms_p99": rnd(percentile(during, 99), 1),
                        "long_gap_ms_max": rnd(max(during), 1) if during else None,
                        "long_gaps": len(during)})
        return out


def parse_sse_line(line: str) -> dict | None:
    """One ``data: {...}`` line of an OpenAI stream -> its JSON (None for other lines and [DONE])."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        return json.loads(payload)
    except ValueError as e:
        raise LoadError(f"the server streamed a line that is not JSON: {payload[:120]!r}") from e


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                      headers: dict | None = None, timing: RequestTiming | None = None) -> RequestTiming:
    """One streamed greedy completion; ``timing`` (filled as tokens arrive) lets others watch it."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t = timing or RequestTiming(start=0.0)
    t.start = time.perf_counter()
    streamed = 0
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers or {}) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")[:300]
            raise LoadError(f"{url} answered {r.status_code}: {text}")
        async for line in r.aiter_lines():
            ev = parse_sse_line(line)
            if ev is None:
                continue
            if "error" in ev:
                raise LoadError(f"{url} streamed an error: {ev['error']}")
            now = time.perf_counter()
            if ev.get("choices"):  # a delta (its text may be empty while a character is incomplete)
                t.token_times.append(now)
                streamed += 1
            usage = ev.get("usage")
            if usage:
                t.tokens = int(usage.get("completion_tokens") or 0)
                t.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if not t.tokens:
        t.tokens = streamed
    if t.tokens != max_tokens:
        raise LoadError(f"a request got {t.tokens} tokens, asked for {max_tokens} with ignore_eos")
    return t


LONG_AFTER_TOKENS = 4  # the long prompt is sent once every request of the batch has this many tokens


async def run_batch(url: str, batch: int, max_tokens: int, prompt_len: int, *, timeout: float = 1800.0,
                    headers: dict | None = None, long_prompt: int = 0) -> BatchResult:
    """``batch`` concurrent streamed requests; the wall time runs from the first send to the last
    token. ``long_prompt`` > 0: one more request with a prompt of about that many tokens (and 2
    new tokens) is sent once every request of the batch has ``LONG_AFTER_TOKENS`` tokens; its
    tokens do not count in tok/s."""
    timings = [RequestTiming(start=0.0) for _ in range(batch)]
    long = RequestTiming(start=0.0) if long_prompt else None
    limits = httpx.Limits(max_connections=batch + 5, max_keepalive_connections=batch + 5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                async def one(i: int) -> None:
                    await one_request(client, url, make_prompt(i, prompt_len), max_tokens, headers, timings[i])

                async def send_long() -> None:
                    while min(len(t.token_times) for t in timings) < min(LONG_AFTER_TOKENS, max_tokens - 1):
                        await trio.sleep(0.005)
                    # a prompt no earlier run sent: vLLM's prefix cache would skip most of its prefill
                    await one_request(client, url, make_prompt(random.randrange(10**6, 10**9), long_prompt), 2,
                                      headers, long)

                for i in range(batch):
                    nursery.start_soon(one, i)
                if long is not None:
                    nursery.start_soon(send_long)
        wall = max(t.token_times[-1] for t in timings) - t0 if all(t.token_times for t in timings) else \
            time.perf_counter() - t0
    return BatchResult(batch=batch, wall_s=wall, requests=timings, long=long)
