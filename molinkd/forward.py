"""Requests asked on a peer that is not a head travel over libp2p to a head; events stream back.

Protocol ``/molink/generate/1`` (frames from :mod:`p2p.framing`):

- asker -> head: ``gen.request {"req": GenerationRequest.to_wire(), "model_hash": str}``
- head -> asker: ``gen.event <event>`` (the backend events of :mod:`molinkd.engine.driver`), then
  ``gen.done {}``; or ``gen.error APIError.to_wire()`` at any point.
- While a request runs the head also sends ``gen.alive {}`` every KEEPALIVE seconds, so an asker
  tells a slow generation (keepalives keep coming) from a hung or vanished head (silence past
  SILENCE_TIMEOUT: 504).
- The asker closing the stream cancels the request on the head (its engine slot is freed).

Every wait has a deadline; a head that dies mid-request surfaces as a 502 to the HTTP client.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Callable

import trio

from molinkd.protocol import MAX_LOGPROBS, MAX_N, APIError, GenerationRequest
from p2p.framing import FrameError
from p2p.streams import FramedStream, StreamClosed

log = logging.getLogger("molinkd.forward")

PROTOCOL = "/molink/generate/1"
REQUEST, EVENT, DONE, ERROR, ALIVE = "gen.request", "gen.event", "gen.done", "gen.error", "gen.alive"
KEEPALIVE = 2.0
SILENCE_TIMEOUT = 15.0
_EVENT_KEYS = {"start": {"prompt", "prompt_tokens", "n"}, "delta": {"index", "text", "token_ids", "logprobs",
                                                                     "finish_reason"},
               "end": {"prompt_tokens", "completion_tokens"}}


def check_event(ev: Any) -> dict:
    """Validate an event that came off the network (types matter: the HTTP layer trusts them)."""
    if not isinstance(ev, dict) or not isinstance(ev.get("ev"), str) or ev["ev"] not in _EVENT_KEYS:
        raise FrameError(f"not a generation event: {str(ev)[:80]}")
    kind = ev["ev"]
    missing = _EVENT_KEYS[kind] - set(ev)
    if missing:
        raise FrameError(f"{kind} event misses {sorted(missing)}")
    if kind == "delta":
        if not _is_int(ev["index"]) or not 0 <= ev["index"] < MAX_N or not isinstance(ev["text"], str):
            raise FrameError("delta event has a bad index or text")
        if not isinstance(ev["token_ids"], list) or not all(_is_int(t) for t in ev["token_ids"]):
            raise FrameError("delta token_ids must be a list of integers")
        if ev["finish_reason"] is not None and not isinstance(ev["finish_reason"], str):
            raise FrameError("delta finish_reason must be a string")
        if ev["logprobs"] is not None:
            _check_logprobs(ev["logprobs"])
    elif kind == "start":
        if not isinstance(ev["prompt"], str) or not _is_int(ev["prompt_tokens"]):
            raise FrameError("start event has wrong field types")
        ids = ev.get("prompt_token_ids")
        if ids is not None and not (isinstance(ids, list) and all(_is_int(t) and t >= 0 for t in ids)):
            raise FrameError("start event prompt_token_ids must be a list of token ids")
        if not _is_int(ev["n"]) or not 1 <= ev["n"] <= MAX_N:
            raise FrameError(f"start event n must be in 1..{MAX_N}")
    elif not all(isinstance(ev[k], int) for k in ("prompt_tokens", "completion_tokens")):
        raise FrameError("end event counts must be integers")
    return ev


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_logprobs(rows: Any) -> None:
    """Per token: a list of ``[token_id:int, logprob:float, rank:int, text:str]`` entries."""
    if not isinstance(rows, list):
        raise FrameError("delta logprobs must be a list")
    for row in rows:
        if not isinstance(row, list) or not 1 <= len(row) <= MAX_LOGPROBS + 1:
            raise FrameError("a logprobs row must be a non-empty list")
        for e in row:
            if not (isinstance(e, list) and len(e) == 4 and _is_int(e[0]) and isinstance(e[1], (int, float))
                    and _is_int(e[2]) and isinstance(e[3], str)):
                raise FrameError("a logprobs entry must be [token_id, logprob, rank, text]")


async def serve_generate(stream: FramedStream, remote: str, *, backend_fn: Callable[[], Any], model_hash: str) -> None:
    """Head side of the protocol: one request per stream."""
    try:
        frame = await stream.recv(timeout=30)
    except (StreamClosed, FrameError, trio.TooSlowError) as e:
        log.info("dropping generate stream from %s: %s", remote, e)
        return
    try:
        if frame.type != REQUEST:
            raise APIError(400, f"expected {REQUEST}, got {frame.type}")
        if frame.get("model_hash") != model_hash:
            raise APIError(409, "model hash mismatch: this head serves another model version")
        req = GenerationRequest.from_wire(frame.get("req"))
        req.request_id = ""  # the head names its own requests (ids from peers could collide)
        backend = backend_fn()
        if backend is None:
            raise APIError(503, "this head's engine is not ready", retryable=True)
    except (APIError, TypeError, ValueError) as e:
        err = e if isinstance(e, APIError) else APIError(400, f"malformed forwarded request: {e}")
        await _try_send(stream, ERROR, err.to_wire())
        return

    async with trio.open_nursery() as nursery:
        async def watch_close() -> None:
            # Anything after the request (or the stream closing) means: stop.
            try:
                await stream.recv(timeout=None)
            except (StreamClosed, FrameError, Exception):
                pass
            nursery.cancel_scope.cancel()

        async def keepalive() -> None:
            try:
                while True:
                    await trio.sleep(KEEPALIVE)
                    await stream.send(ALIVE, {})
            except (StreamClosed, ConnectionError):
                return  # the asker is gone; watch_close ends the request

        nursery.start_soon(watch_close)
        nursery.start_soon(keepalive)
        try:
            events = backend.stream(req)
            async with contextlib.aclosing(events):
                async for ev in events:
                    await stream.send(EVENT, ev)
            await stream.send(DONE, {})
        except APIError as e:
            await _try_send(stream, ERROR, e.to_wire())
        except (StreamClosed, ConnectionError) as e:
            log.info("asker %s went away: %s", remote, e)
        nursery.cancel_scope.cancel()


async def _try_send(stream: FramedStream, t: str, body: Any) -> None:
    try:
        with trio.move_on_after(5):
            await stream.send(t, body)
    except Exception:
        pass


class RemoteBackend:
    """Forward requests to a head chosen by ``pick_heads()`` (best first)."""

    def __init__(self, node: Any, model_name: str, model_hash: str, pick_heads: Callable[[], list[str]]) -> None:
        self.node = node
        self.model_name = model_name
        self.model_hash = model_hash
        self.pick_heads = pick_heads
        self.active = 0
        self.total_requests = 0

    async def _open(self) -> FramedStream:
        heads = self.pick_heads()
        if not heads:
            raise APIError(503, "no head serving this model is reachable yet; retry shortly (see /status)",
                           retryable=True)
        errors = []
        for peer in heads[:3]:
            try:
                return await self.node.open_stream(peer, PROTOCOL, timeout=10)
            except Exception as e:  # DialError and friends
                errors.append(f"{peer[:12]}: {e}")
        raise APIError(502, "could not reach any head: " + "; ".join(errors), retryable=True)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[dict]:
        stream = await self._open()
        self.active += 1
        self.total_requests += 1
        try:
            await stream.send(REQUEST, {"req": req.to_wire(), "model_hash": self.model_hash})
            while True:
                try:
                    frame = await stream.recv(timeout=SILENCE_TIMEOUT)
                except trio.TooSlowError:
                    raise APIError(504, f"the head {stream.peer[:12]} went silent for {SILENCE_TIMEOUT:.0f}s "
                                        "(hung or unreachable); retry, another head may answer",
                                   retryable=True) from None
                except (StreamClosed, FrameError) as e:
                    raise APIError(502, f"the head {stream.peer[:12]} failed mid-request: {e}",
                                   retryable=True) from None
                if frame.type == ALIVE:
                    continue
                if frame.type == EVENT:
                    try:
                        yield check_event(frame.body)
                    except FrameError as e:
                        raise APIError(502, f"the head sent a malformed event: {e}") from None
                elif frame.type == DONE:
                    return
                elif frame.type == ERROR:
                    raise APIError.from_wire(frame.body)
                else:
                    raise APIError(502, f"the head sent an unexpected {frame.type!r} frame")
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await stream.close()
