"""Requests survive the loss of the engine or peer that serves them.

When a pipeline stage dies, the head's engine stops and restarts on a new route; when a head
dies, a gateway's forwarded request breaks. Either way the backend raises an
:class:`~molinkd.protocol.APIError` with ``retryable=True``. :func:`resilient_stream` then waits
(bounded) for a backend to serve again and *resumes* the request: the tokens already generated
are appended to the prompt and the new engine recomputes their KV state in one prefill, then
generation continues with the remaining budget. The client sees a pause, not an error, and
never a token twice or a token missing.

What a resume cannot preserve (said here so nobody is surprised):

* requests with ``n > 1`` resume only if no choice has produced a token yet;
* a stop string that straddles the point of failure is not matched (each side is checked);
* frequency and presence penalties count only tokens generated after the resume;
* a seeded sampler starts a fresh random stream at the resume point;
* even greedy decoding may take another path after the resume point: one bf16 prefill over
  prompt + generated tokens does not round exactly as the step-by-step decode did (measured on
  the embedded model: continuations from 4 prompts x 4 cut points matched an undisturbed
  80-token run in 7 of 16 cases).

The pure part (:func:`continuation`) is unit tested; the loop is exercised by killing a stage
mid-request in the swarm tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from molinkd import logs
from molinkd.protocol import APIError, GenerationRequest

log = logging.getLogger(__name__)

RESUME_TIMEOUT = 240.0  # how long a request waits for a serving backend after losing one
MAX_RESUMES = 3


def continuation(req: GenerationRequest, prompt_ids: list[int], generated: list[int]) -> GenerationRequest:
    """The request that carries on where ``req`` stopped after generating ``generated``.

    With nothing generated yet this is ``req`` itself (it simply runs again). Otherwise: the
    original prompt tokens plus the generated ones as a plain token prompt (no chat template,
    no echo), the token budgets reduced by what was already generated.
    """
    if not generated:
        return dataclasses.replace(req, request_id="")
    sampling = dict(req.sampling)
    if sampling.get("n", 1) != 1:
        raise ValueError("only single-choice requests can be continued")
    if sampling.get("min_tokens"):
        sampling["min_tokens"] = max(0, int(sampling["min_tokens"]) - len(generated))
    max_tokens = None if req.max_tokens is None else req.max_tokens - len(generated)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError("nothing left to generate")
    return GenerationRequest(
        kind="completion",
        prompt_token_ids=[*prompt_ids, *generated],
        sampling=sampling,
        max_tokens=max_tokens,
        stream=req.stream,
        echo=False,
    )


def no_backend(why: str | None = None) -> APIError:
    if why:
        return APIError(503, f"no head serving this model is reachable: {why}; retry later and see /status")
    return APIError(503, "no head serving this model is reachable yet (engine loading, or no route); "
                         "retry in a few seconds and see /status")


async def wait_for_backend(backend_fn: Callable[[], Any], deadline: float) -> Any:
    """The current backend once it is ready to serve (``ready`` attribute, default True), or None
    when the trio clock passes ``deadline``."""
    with trio.move_on_at(deadline):
        while True:
            b = backend_fn()
            if b is not None and getattr(b, "ready", True):
                return b
            await trio.sleep(0.5)
    return None


async def resilient_stream(
    req: GenerationRequest,
    backend_fn: Callable[[], Any],
    *,
    timeout: float = RESUME_TIMEOUT,
    max_resumes: int = MAX_RESUMES,
    on_resume: Callable[[str, int, int], None] | None = None,
    why_unavailable: Callable[[], str | None] | None = None,
) -> AsyncIterator[dict]:
    """Events of ``req`` (see :mod:`molinkd.engine.driver`), resumed across backend failures.

    The first backend is ``backend_fn()`` (an APIError 503 if there is none: a request that has
    not started does not wait). After a retryable failure the request waits up to ``timeout``
    seconds for a backend and continues there, at most ``max_resumes`` times;
    ``on_resume(error, tokens_generated, attempt)`` hears of each resume. ``why_unavailable()``
    says why no backend serves (e.g. the layers no peer covers), for the 503 a request then gets.
    """

    def why() -> str:
        reason = why_unavailable() if why_unavailable is not None else None
        return f" ({reason})" if reason else ""

    backend = backend_fn()
    if backend is None:
        raise no_backend(why_unavailable() if why_unavailable is not None else None)
    prompt_ids: list[int] | None = None
    prompt_tokens = 0
    generated: dict[int, list[int]] = {}
    finished: set[int] = set()
    started = False
    resumes = 0
    deadline = math.inf
    current = req
    while True:
        progressed = False
        try:
            async with contextlib.aclosing(backend.stream(current)) as events:
                async for ev in events:
                    kind = ev["ev"]
                    if kind == "start":
                        if not started:
                            started = True
                            prompt_ids = ev.get("prompt_token_ids")
                            prompt_tokens = ev["prompt_tokens"]
                            yield ev
                    elif kind == "delta":
                        progressed = True
                        generated.setdefault(ev["index"], []).extend(ev["token_ids"])
                        if ev["finish_reason"] is not None:
                            finished.add(ev["index"])
                        yield ev
                    elif kind == "end":
                        total = sum(len(t) for t in generated.values())
                        yield {**ev, "prompt_tokens": prompt_tokens or ev["prompt_tokens"], "completion_tokens": total}
            return
        except APIError as e:
            if not e.retryable:
                raise
            so_far = sum(len(t) for t in generated.values())
            if finished and finished == set(generated) and len(finished) == 1 and req.sampling.get("n", 1) == 1:
                # the answer was complete; only its end event was lost
                yield {"ev": "end", "prompt_tokens": prompt_tokens, "completion_tokens": so_far}
                return
            try:
                if so_far and (prompt_ids is None or finished or len(generated) != 1):
                    raise ValueError("this request cannot be continued (several choices, or an older peer)")
                current = continuation(req, prompt_ids or [], generated.get(0, []))
            except ValueError as why:
                raise APIError(e.status, f"{e.message}; {why}") from e
            now = trio.current_time()
            if progressed or deadline == math.inf:
                # a backend that made progress and then broke: a new resume with a fresh deadline
                resumes += 1
                if resumes > max_resumes:
                    raise APIError(e.status, f"{e.message} (gave up after {max_resumes} resumes)") from e
                deadline = now + timeout
                if on_resume is not None:  # the caller logs it (with the request's context)
                    on_resume(e.message, so_far, resumes)
                else:
                    log.warning("request lost its backend; resuming",
                                extra=logs.kv(error=e.message, generated=so_far, attempt=resumes))
            elif now >= deadline:
                raise APIError(503, f"{e.message}; no backend could resume the request within {timeout:.0f}s"
                                    f"{why()}") from e
            else:
                await trio.sleep(1.0)  # a backend that is not serving yet (say, still announced as ready)
            backend = await wait_for_backend(backend_fn, deadline)
            if backend is None:
                raise APIError(503, f"{e.message}; no backend came back within {timeout:.0f}s to resume "
                                    f"the request{why()}") from e
