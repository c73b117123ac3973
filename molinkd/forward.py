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

Limits on the head (:class:`GenerateGuard`, the same as HTTP's): frames of at most
``MAX_GENERATE_FRAME`` (4 MiB, HTTP's body limit) both ways, the request within FIRST_FRAME_TIMEOUT,
the prompt bounded before it is tokenized (:func:`check_request_size`), ``n``/``logprobs``/sampling
re-validated by :meth:`GenerationRequest.from_wire`, at most ``max_per_peer`` requests running per
asking peer (more get ``gen.error`` 429). Authorization mirrors HTTP's: with ``--allow-peers`` the
asker must be listed; with ``--api-key`` the request carries ``auth``, an HMAC-SHA256 under the key
of ``molink/generate/1|<asker peer id>|<head peer id>`` (compared with ``hmac.compare_digest``).
The key itself never crosses the wire, so a hostile peer posing as a head learns nothing it could
use elsewhere (the MAC names the head it was made for; the asker id is the authenticated libp2p
peer). A gateway signs with its own ``--api-key``: peers of one swarm share a key, and a client's
bearer key was already checked by the gateway's HTTP layer. Cost per request: one HMAC (~2 us).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import logging
from typing import Any, AsyncIterator, Callable

import trio

from molinkd.limits import GENERATE_MSG, GENERATE_REPLY_MSG
from molinkd.protocol import MAX_LOGPROBS, MAX_N, APIError, GenerationRequest
from p2p.framing import FrameError
from p2p.streams import FramedStream, StreamClosed

log = logging.getLogger("molinkd.forward")

PROTOCOL = "/molink/generate/1"
REQUEST, EVENT, DONE, ERROR, ALIVE = "gen.request", "gen.event", "gen.done", "gen.error", "gen.alive"
KEEPALIVE = 2.0
SILENCE_TIMEOUT = 8.0  # four keepalives missed: a hung head costs its clients 8 s before they resume elsewhere
FIRST_FRAME_TIMEOUT = 10.0
MAX_GENERATE_FRAME = 4 << 20  # the HTTP API's body limit (molinkd.api.MAX_BODY)
MAX_PER_PEER = 8  # concurrent forwarded requests per asking peer
# No tokenizer we serve has a token over 128 characters (SmolLM2's longest: 81), so a prompt of more
# than max_model_len * 128 characters cannot fit the context: refused before tokenizing it.
MAX_CHARS_PER_TOKEN = 128
DEFAULT_CONTEXT = 2048
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


def request_mac(api_key: str, asker: str, head: str) -> str:
    """The ``auth`` field of a request from ``asker`` to ``head`` under ``api_key`` (hex)."""
    msg = f"{PROTOCOL}|{asker}|{head}".encode()
    return hmac.new(api_key.encode(), msg, hashlib.sha256).hexdigest()


def check_request_size(req: GenerationRequest, max_model_len: int) -> None:
    """Refuse a request that cannot fit the context, before any tokenization (pure, O(prompt)).
    Raises APIError 400."""
    if req.prompt_token_ids is not None and len(req.prompt_token_ids) >= max_model_len:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{len(req.prompt_token_ids)}. Shorten the prompt.", param="prompt")
    chars = len(req.prompt or "")
    for m in req.messages or ():
        c = m.get("content")
        chars += len(c) if isinstance(c, str) else sum(len(str(x)) for x in c or ())
    if chars > max_model_len * MAX_CHARS_PER_TOKEN:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; a prompt of {chars} "
                            "characters cannot fit. Shorten the prompt.", param="prompt")
    if req.max_tokens is not None and req.max_tokens >= max_model_len:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; max_tokens "
                            f"{req.max_tokens} cannot fit. Lower max_tokens.", param="max_tokens")


class GenerateGuard:
    """Who may ask this head to generate, and how much at once (one per daemon).

    ``api_key``: when set, requests must carry :func:`request_mac` for (asker, ``peer_id``).
    ``peer_allowed(peer) -> bool``: the ``--allow-peers`` predicate (``Node.peer_allowed``).
    ``max_per_peer``: concurrent requests per asking peer."""

    def __init__(self, peer_id: str, *, api_key: str | None = None,
                 peer_allowed: Callable[[str], bool] | None = None, max_per_peer: int = MAX_PER_PEER) -> None:
        self.peer_id = peer_id
        self.api_key = api_key
        self.peer_allowed = peer_allowed
        self.max_per_peer = max_per_peer
        self.active: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[int] = collections.Counter()  # by status

    def authorize(self, remote: str, body: Any) -> None:
        """Raise APIError 403/401 unless ``remote`` may ask (cheap: a set lookup and one HMAC)."""
        if self.peer_allowed is not None and not self.peer_allowed(remote):
            raise APIError(403, "this head serves only the peers in its --allow-peers list")
        if self.api_key:
            got = body.get("auth") if isinstance(body, dict) else None
            want = request_mac(self.api_key, remote, self.peer_id)
            if not isinstance(got, str) or not hmac.compare_digest(got.encode(), want.encode()):
                raise APIError(401, "this head requires its API key: start the asking peer with the same "
                                    "--api-key as the swarm")

    def check_slot(self, remote: str) -> None:
        """APIError 429 when ``remote`` already runs ``max_per_peer`` requests."""
        if self.active[remote] >= self.max_per_peer:
            raise APIError(429, f"too many concurrent requests from peer {remote[:16]} (limit "
                                f"{self.max_per_peer}); retry later", retryable=True)

    @contextlib.contextmanager
    def slot(self, remote: str):
        """Hold one of ``remote``'s concurrent-request slots (after :meth:`check_slot`)."""
        self.active[remote] += 1
        try:
            yield
        finally:
            self.active[remote] -= 1
            if self.active[remote] <= 0:
                del self.active[remote]


async def serve_generate(stream: FramedStream, remote: str, *, backend_fn: Callable[[], Any], model_hash: str,
                         guard: GenerateGuard | None = None) -> None:
    """Head side of the protocol: one request per stream (limits and authorization: ``guard``)."""
    stream.limits = GENERATE_MSG  # HTTP's 4 MiB, prompt strings up to that size, no raw bytes
    try:
        frame = await stream.recv(timeout=FIRST_FRAME_TIMEOUT)
    except (StreamClosed, FrameError, trio.TooSlowError) as e:
        log.info("dropping generate stream from %s: %s", remote, e)
        return
    try:
        if frame.type != REQUEST:
            raise APIError(400, f"expected {REQUEST}, got {frame.type}")
        if guard is not None:
            guard.authorize(remote, frame.body)
        if frame.get("model_hash") != model_hash:
            raise APIError(409, "model hash mismatch: this head serves another model version")
        req = GenerationRequest.from_wire(frame.get("req"))
        req.request_id = ""  # the head names its own requests (ids from peers could collide)
        backend = backend_fn()
        if backend is None:
            raise APIError(503, "this head's engine is not ready", retryable=True)
        engine = getattr(backend, "engine", None)
        check_request_size(req, getattr(engine, "max_model_len", 0) or DEFAULT_CONTEXT)
        if guard is not None:
            guard.check_slot(remote)
    except (APIError, TypeError, ValueError) as e:
        err = e if isinstance(e, APIError) else APIError(400, f"malformed forwarded request: {e}")
        if guard is not None:
            guard.refused[err.status] += 1
        await _try_send(stream, ERROR, err.to_wire())
        return
    # no await since check_slot: the slot cannot have been taken meanwhile
    with guard.slot(remote) if guard is not None else contextlib.nullcontext():
        await _run_request(stream, remote, backend, req)


async def _run_request(stream: FramedStream, remote: str, backend: Any, req: GenerationRequest) -> None:
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

    def __init__(self, node: Any, model_name: str, model_hash: str, pick_heads: Callable[[], list[str]],
                 api_key: str | None = None) -> None:
        self.node = node
        self.model_name = model_name
        self.model_hash = model_hash
        self.pick_heads = pick_heads
        self.api_key = api_key  # signs requests for heads that require it (see the module docstring)
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
                stream = await self.node.open_stream(peer, PROTOCOL, timeout=10, max_frame=MAX_GENERATE_FRAME)
                # the events coming back: a whole non-streamed completion with logprobs may be one
                stream.limits = GENERATE_REPLY_MSG
                return stream
            except Exception as e:  # DialError and friends
                errors.append(f"{peer[:12]}: {e}")
        raise APIError(502, "could not reach any head: " + "; ".join(errors), retryable=True)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[dict]:
        stream = await self._open()
        self.active += 1
        self.total_requests += 1
        try:
            body = {"req": req.to_wire(), "model_hash": self.model_hash}
            if self.api_key:
                body["auth"] = request_mac(self.api_key, self.node.peer_id, stream.peer)
            await stream.send(REQUEST, body)
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
