"""Resuming a request after its backend is lost: the continuation request and the event stream."""

from __future__ import annotations

import pytest
import trio

from molinkd.protocol import APIError, GenerationRequest
from molinkd.resume import continuation, resilient_stream


def _req(**kw) -> GenerationRequest:
    base = dict(kind="chat", messages=[{"role": "user", "content": "hi"}], sampling={"temperature": 0.0},
                max_tokens=10, stream=True, request_id="r1")
    base.update(kw)
    return GenerationRequest(**base)


def test_continuation_appends_generated_tokens_and_reduces_budgets() -> None:
    req = _req(sampling={"temperature": 0.0, "min_tokens": 5, "seed": 3})
    c = continuation(req, [1, 2, 3], [7, 8])
    assert c.kind == "completion" and c.prompt_token_ids == [1, 2, 3, 7, 8] and c.messages is None
    assert c.max_tokens == 8 and c.sampling == {"temperature": 0.0, "min_tokens": 3, "seed": 3}
    assert c.stream and not c.echo and c.request_id == ""
    assert req.sampling["min_tokens"] == 5  # the original is untouched
    # "the rest of the context" stays so: the backend resolves it against the longer prompt
    assert continuation(_req(max_tokens=None), [1], [2]).max_tokens is None


def test_continuation_without_tokens_reruns_the_request() -> None:
    req = _req(sampling={"n": 3})
    c = continuation(req, [], [])
    assert c.messages == req.messages and c.sampling == {"n": 3} and c.request_id == ""


def test_continuation_refuses_what_cannot_continue() -> None:
    with pytest.raises(ValueError):
        continuation(_req(sampling={"n": 2}), [1], [2])
    with pytest.raises(ValueError):
        continuation(_req(max_tokens=2), [1], [2, 3])


class Scripted:
    """A backend that plays events and then fails (or ends); records what it was asked."""

    def __init__(self, tokens: list[int], fail: APIError | None, prompt_ids: list[int] | None = None) -> None:
        self.tokens, self.fail, self.prompt_ids = tokens, fail, prompt_ids
        self.asked: list[GenerationRequest] = []
        self.model_name = "m"
        self.ready = True  # False once it failed (a dead engine)

    async def stream(self, req: GenerationRequest):
        self.asked.append(req)
        start = {"ev": "start", "prompt": "p", "prompt_tokens": 3, "n": 1}
        if self.prompt_ids is not None:
            start["prompt_token_ids"] = self.prompt_ids
        yield start
        for t in self.tokens:
            await trio.sleep(0)
            yield {"ev": "delta", "index": 0, "text": f"<{t}>", "token_ids": [t], "logprobs": None,
                   "finish_reason": "length" if t == self.tokens[-1] and self.fail is None else None}
        if self.fail is not None:
            self.ready = False
            raise self.fail
        yield {"ev": "end", "prompt_tokens": len(req.prompt_token_ids or []), "completion_tokens": len(self.tokens)}


async def _collect(req, backends: list, timeout: float = 5.0) -> list[dict]:
    state = {"i": 0}

    def backend_fn():
        return backends[min(state["i"], len(backends) - 1)]

    async def switch() -> None:  # the daemon brings up a new engine a little later
        await trio.sleep(0.2)
        state["i"] += 1

    out: list[dict] = []
    err: list[BaseException] = []
    async with trio.open_nursery() as n:
        n.start_soon(switch)
        try:
            async for ev in resilient_stream(req, backend_fn, timeout=timeout):
                out.append(ev)
        except APIError as e:
            err.append(e)
        n.cancel_scope.cancel()
    if err:
        raise err[0]
    return out


async def test_a_lost_backend_is_resumed_on_the_next_one() -> None:
    lost = APIError(500, "the engine failed: EngineDeadError", retryable=True)
    first = Scripted([10, 11], lost, prompt_ids=[1, 2, 3])
    second = Scripted([12, 13, 14], None, prompt_ids=[1, 2, 3, 10, 11])
    evs = await _collect(_req(max_tokens=5), [first, second])
    assert [e["ev"] for e in evs] == ["start", "delta", "delta", "delta", "delta", "delta", "end"]
    assert [t for e in evs if e["ev"] == "delta" for t in e["token_ids"]] == [10, 11, 12, 13, 14]
    assert evs[-1] == {"ev": "end", "prompt_tokens": 3, "completion_tokens": 5}
    (cont,) = second.asked
    assert cont.prompt_token_ids == [1, 2, 3, 10, 11] and cont.max_tokens == 3 and cont.kind == "completion"


async def test_errors_that_are_not_retryable_propagate_at_once() -> None:
    bad = Scripted([10], APIError(400, "bad stop"), prompt_ids=[1])
    with pytest.raises(APIError) as ei:
        await _collect(_req(), [bad, Scripted([1], None, [1])])
    assert ei.value.status == 400


async def test_no_backend_coming_back_gives_503_in_bounded_time() -> None:
    lost = APIError(502, "the head failed mid-request", retryable=True)
    first = Scripted([10], lost, prompt_ids=[1])
    with trio.fail_after(3):
        with pytest.raises(APIError) as ei:
            async for _ in resilient_stream(_req(), lambda: first, timeout=1.0):
                pass
    assert ei.value.status == 503 and "resume" in ei.value.message


async def test_a_backend_that_keeps_breaking_is_given_up_on() -> None:
    flaky = Scripted([10], APIError(500, "the engine failed", retryable=True), prompt_ids=[1])

    def backend_fn():
        flaky.ready = True  # it claims to be back at once, and breaks again
        return flaky

    with trio.fail_after(5):
        with pytest.raises(APIError) as ei:
            async for _ in resilient_stream(_req(max_tokens=20), backend_fn, timeout=10, max_resumes=2):
                pass
    assert "gave up after 2 resumes" in ei.value.message and len(flaky.asked) == 3


async def test_an_older_peer_without_prompt_ids_cannot_be_continued() -> None:
    lost = APIError(502, "the head failed mid-request", retryable=True)
    with pytest.raises(APIError) as ei:
        await _collect(_req(), [Scripted([10], lost, prompt_ids=None), Scripted([1], None, [1])])
    assert ei.value.status == 502 and "cannot be continued" in ei.value.message


async def test_a_request_that_lost_its_backend_before_any_token_simply_reruns() -> None:
    lost = APIError(503, "the engine is not running", retryable=True)
    second = Scripted([5, 6], None, prompt_ids=[1, 2, 3])
    evs = await _collect(_req(sampling={"n": 1}), [Scripted([], lost, None), second])
    assert second.asked[0].kind == "chat"  # the original request, not a continuation
    assert [t for e in evs if e["ev"] == "delta" for t in e["token_ids"]] == [5, 6]
    assert sum(e["ev"] == "start" for e in evs) == 1


def test_retryable_survives_the_wire() -> None:
    assert APIError.from_wire(APIError(502, "head lost", retryable=True).to_wire()).retryable
    assert not APIError.from_wire({"status": 500, "message": "from an older peer"}).retryable


async def test_503_names_why_no_backend_serves() -> None:
    """A head whose route lost a span it cannot replace: waiting requests end with a 503 that says
    which layers no peer serves, and new requests get it at once."""
    why = "layers 10:20 are served by no usable peer"
    lost = APIError(503, "the engine is not running", retryable=True)
    first = Scripted([10], lost, prompt_ids=[1])
    backends = [first]
    with trio.fail_after(3):
        with pytest.raises(APIError) as ei:
            async for _ in resilient_stream(_req(), lambda: backends[0] if first.ready else None, timeout=1.0,
                                            why_unavailable=lambda: why):
                pass
    assert ei.value.status == 503 and why in ei.value.message
    with pytest.raises(APIError) as ei:
        async for _ in resilient_stream(_req(), lambda: None, why_unavailable=lambda: why):
            pass
    assert ei.value.status == 503 and why in ei.value.message
