"""HTTP API (Quart on trio): vLLM's ``/generate``, OpenAI's ``/v1/*``, ``/health``, ``/ready``,
``/status``, ``/metrics`` (Prometheus).

The app talks to a *backend* with one method, ``stream(GenerationRequest) -> async iterator of
events`` (see :mod:`molinkd.engine.driver`), and a ``model_name``. The backend may run the engine
here (a head) or forward to a head over libp2p: the HTTP side does not care. A request whose
backend is lost mid-way is resumed on the next one (:mod:`molinkd.resume`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from molinkd.metrics import GEN_ENDPOINTS, Metrics
from molinkd.protocol import (
    APIError,
    GenerationRequest,
    check_model_name,
    parse_chat,
    parse_completion,
    parse_generate,
)
from molinkd.resume import no_backend, resilient_stream

log = logging.getLogger("molinkd.api")
MAX_BODY = 4 << 20
MAX_DRAIN = 64 << 20  # past this, stop reading and let the connection close
# Connections (hypercorn has no cap of its own: every accepted socket gets a task).
MAX_CONNECTIONS = 1024  # open at once; more are answered 503 and closed
MAX_CONNECTIONS_PER_IP = 128  # one client address cannot take them all (a load balancer may need more)
IDLE_TIMEOUT = 15.0  # a connection without a request in flight (incl. one trickling headers) is closed
BODY_TIMEOUT = 30  # a request's body must arrive within this (Quart's BODY_TIMEOUT, 408 after)


class Backend:  # structural type (documentation only)
    model_name: str

    def stream(self, req: GenerationRequest) -> AsyncIterator[dict]:  # pragma: no cover
        raise NotImplementedError


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json")


def _error(e: APIError) -> Response:
    return _json(e.body(), e.status)


def create_app(
    backend_fn: Callable[[], Any],
    status_fn: Callable[[], Awaitable[dict]],
    *,
    api_key: str | None = None,
    metrics: Metrics | None = None,
    ready_fn: Callable[[], tuple[bool, str]] | None = None,
    why_unavailable: Callable[[], str | None] | None = None,
) -> QuartTrio:
    """Build the Quart app. ``backend_fn()`` returns the current backend (or None if none yet);
    ``metrics`` counts requests (and resumes) and renders ``/metrics``; ``ready_fn()`` answers
    ``/ready`` as ``(ready, reason)``; ``why_unavailable()`` explains a missing backend in 503
    answers (e.g. which layers no peer serves)."""
    metrics = metrics if metrics is not None else Metrics()
    app = QuartTrio("molinkd")
    # Size is checked in _body(), which drains an oversized body before answering 413: clients that
    # upload before reading (most do) would otherwise block on a full socket and never see the 413.
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["RESPONSE_TIMEOUT"] = None  # long generations stream for minutes
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException):  # 404/405/413 from routing and size checks
        status = e.code or 500
        msg = {413: f"request body too large (the limit is {MAX_BODY} bytes)"}.get(status, e.description or e.name)
        return _error(APIError(status, msg))

    @app.errorhandler(APIError)
    async def _api_error(e: APIError):
        if request.path in GEN_ENDPOINTS and not getattr(g, "tracked", False):
            metrics.request_done(request.path, e.status, error=e.message)  # failed before it ran
        return _error(e)

    @app.before_request
    async def _auth():
        g.t0 = time.monotonic()
        if api_key and request.path not in ("/health", "/ready"):
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                if request.path in GEN_ENDPOINTS:
                    metrics.request_done(request.path, 401)
                return _error(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'"))
        return None

    async def _body() -> Any:
        declared = request.content_length
        if declared is None or declared > MAX_BODY:
            buf, total = bytearray(), 0
            async for chunk in request.body:
                total += len(chunk)
                if total <= MAX_BODY:
                    buf += chunk
                elif total > MAX_DRAIN:
                    break
            if total > MAX_BODY:
                raise APIError(413, f"request body too large ({total} bytes; the limit is {MAX_BODY})")
            raw = bytes(buf)
        else:
            raw = await request.get_data(as_text=False)
        if not raw:
            raise APIError(400, "empty request body: send a JSON object")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None

    def _backend() -> Any:
        b = backend_fn()
        if b is None:
            raise no_backend(why_unavailable() if why_unavailable is not None else None)
        return b

    @app.get("/health")
    async def health():
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready():
        ok, reason = ready_fn() if ready_fn is not None else (backend_fn() is not None, "no backend")
        return _json({"ready": ok, "reason": reason}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint():
        body = metrics.render()  # on the loop: the collector reads the daemon's live state
        return Response(body, status=200, mimetype="text/plain", content_type=CONTENT_TYPE_LATEST)

    @app.get("/status")
    async def status():
        return _json(await status_fn())

    @app.get("/v1/models")
    async def models():
        b = backend_fn()
        name = b.model_name if b is not None else (await status_fn()).get("model", {}).get("name", "unknown")
        return _json({
            "object": "list",
            "data": [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "molink"}],
        })

    @app.post("/generate")
    async def generate():
        req = parse_generate(await _body())
        return await _run(req, _generate_stream, _generate_final)

    @app.post("/v1/completions")
    async def completions():
        return await _openai(parse_completion, _completion_stream, _completion_final)

    @app.post("/v1/chat/completions")
    async def chat():
        return await _openai(parse_chat, _chat_stream, _chat_final)

    async def _openai(parse, streamer, finisher) -> Response:
        """An OpenAI endpoint: model name check, parsing, then stream or final answer."""
        body = await _body()
        b = _backend()
        check_model_name(body, b.model_name)
        req = parse(body)
        opts = _stream_options(body)
        return await _run(req, lambda ev, r: streamer(ev, r, b.model_name, opts),
                          lambda ev, r: finisher(ev, r, b.model_name))

    async def _run(req: GenerationRequest, streamer, finisher) -> Response:
        req.request_id = req.request_id or uuid.uuid4().hex
        endpoint = request.path
        g.tracked = True  # from here on, metrics.track counts the outcome

        def resumed(error: str, generated: int, attempt: int) -> None:
            metrics.request_resumed(endpoint, req.request_id, error, generated, attempt)

        events = metrics.track(endpoint, req.request_id, resilient_stream(req, backend_fn, on_resume=resumed,
                                                                why_unavailable=why_unavailable),
                               g.t0, bool(req.stream))
        # Pull the first event before answering, so validation errors get a proper status code.
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            raise APIError(502, "the serving peer closed the request without an answer") from None
        except BaseException:
            await events.aclose()
            raise

        async def all_events() -> AsyncIterator[dict]:
            async with contextlib.aclosing(events):
                yield first
                async for ev in events:
                    yield ev

        if req.stream:
            mimetype = "text/event-stream" if req.kind != "generate" else "application/json"
            resp = Response(streamer(all_events(), req), mimetype=mimetype)
            resp.timeout = None
            return resp
        return _json(await finisher(all_events(), req))

    return app


def _stream_options(body: dict) -> dict:
    so = body.get("stream_options")
    if so is None:
        return {}
    if not isinstance(so, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return so


# ---------------------------------------------------------------- response shaping


class _Acc:
    """Accumulates events of one request: per-choice text, tokens, logprobs, finish reasons."""

    def __init__(self) -> None:
        self.prompt = ""
        self.n = 1
        self.text: dict[int, str] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list] = {}
        self.finish: dict[int, str | None] = {}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def feed(self, ev: dict) -> None:
        kind = ev.get("ev")
        if kind == "start":
            self.prompt = ev.get("prompt", "")
            self.n = ev.get("n", 1)
            self.usage["prompt_tokens"] = ev.get("prompt_tokens", 0)
            for i in range(self.n):
                self.text.setdefault(i, "")
                self.token_ids.setdefault(i, [])
                self.logprobs.setdefault(i, [])
                self.finish.setdefault(i, None)
        elif kind == "delta":
            i = ev["index"]
            self.text[i] = self.text.get(i, "") + ev.get("text", "")
            self.token_ids.setdefault(i, []).extend(ev.get("token_ids", []))
            if ev.get("logprobs"):
                self.logprobs.setdefault(i, []).extend(ev["logprobs"])
            if ev.get("finish_reason"):
                self.finish[i] = ev["finish_reason"]
        elif kind == "end":
            self.usage["prompt_tokens"] = ev.get("prompt_tokens", self.usage["prompt_tokens"])
            self.usage["completion_tokens"] = ev.get("completion_tokens", 0)
            self.usage["total_tokens"] = self.usage["prompt_tokens"] + self.usage["completion_tokens"]


def _completion_logprobs(entries: list, text_offset0: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    off = text_offset0
    for pos in entries:
        tid, lp, _rank, dec = pos[0]
        tokens.append(dec)
        lps.append(lp)
        tops.append({e[3]: e[1] for e in pos[1:]})
        offsets.append(off)
        off += len(dec)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(entries: list) -> dict:
    content = []
    for pos in entries:
        tid, lp, _rank, dec = pos[0]
        content.append({
            "token": dec,
            "logprob": lp,
            "bytes": list(dec.encode("utf-8")),
            "top_logprobs": [{"token": e[3], "logprob": e[1], "bytes": list(e[3].encode("utf-8"))} for e in pos[1:]],
        })
    return {"content": content}


def _envelope(rid: str, obj: str, model: str, choices: list, usage: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage}


async def _generate_final(events: AsyncIterator[dict], req: GenerationRequest) -> dict:
    acc = _Acc()
    async for ev in events:
        acc.feed(ev)
    return {"text": [acc.prompt + acc.text[i] for i in range(acc.n)]}


async def _generate_stream(events: AsyncIterator[dict], req: GenerationRequest) -> AsyncIterator[bytes]:
    """vLLM demo server streaming: NUL-separated JSON objects with the cumulative text."""
    acc = _Acc()
    try:
        async for ev in events:
            acc.feed(ev)
            if ev.get("ev") == "delta":
                yield (json.dumps({"text": [acc.prompt + acc.text[i] for i in range(acc.n)]}) + "\0").encode()
    except APIError as e:
        yield (json.dumps(e.body()) + "\0").encode()


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _completion_final(events: AsyncIterator[dict], req: GenerationRequest, model: str) -> dict:
    acc = _Acc()
    async for ev in events:
        acc.feed(ev)
    choices = []
    for i in range(acc.n):
        text = (acc.prompt if req.echo else "") + acc.text[i]
        lp = None
        if "logprobs" in req.sampling:
            lp = _completion_logprobs(acc.logprobs[i], len(acc.prompt) if req.echo else 0)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": acc.finish[i]})
    return _envelope(f"cmpl-{req.request_id}", "text_completion", model, choices, acc.usage)


async def _completion_stream(events: AsyncIterator[dict], req: GenerationRequest, model: str, opts: dict):
    acc = _Acc()
    created = int(time.time())
    cid = f"cmpl-{req.request_id}"
    offsets: dict[int, int] = {}
    try:
        async for ev in events:
            acc.feed(ev)
            kind = ev.get("ev")
            if kind == "start" and req.echo:
                for i in range(acc.n):
                    offsets[i] = len(acc.prompt)
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                                "choices": [{"index": i, "text": acc.prompt, "logprobs": None, "finish_reason": None}]})
            elif kind == "delta":
                i = ev["index"]
                lp = None
                if "logprobs" in req.sampling and ev.get("logprobs"):
                    lp = _completion_logprobs(ev["logprobs"], offsets.get(i, 0))
                offsets[i] = offsets.get(i, 0) + len(ev.get("text", ""))
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": i, "text": ev.get("text", ""), "logprobs": lp,
                                         "finish_reason": ev.get("finish_reason")}]})
        if opts.get("include_usage"):
            yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": acc.usage})
    except APIError as e:
        yield _sse(e.body())
    yield b"data: [DONE]\n\n"


async def _chat_final(events: AsyncIterator[dict], req: GenerationRequest, model: str) -> dict:
    acc = _Acc()
    async for ev in events:
        acc.feed(ev)
    choices = []
    for i in range(acc.n):
        lp = _chat_logprobs(acc.logprobs[i]) if "logprobs" in req.sampling else None
        choices.append({
            "index": i,
            "message": {"role": "assistant", "content": acc.text[i]},
            "logprobs": lp,
            "finish_reason": acc.finish[i],
        })
    return _envelope(f"chatcmpl-{req.request_id}", "chat.completion", model, choices, acc.usage)


async def _chat_stream(events: AsyncIterator[dict], req: GenerationRequest, model: str, opts: dict):
    acc = _Acc()
    created = int(time.time())
    cid = f"chatcmpl-{req.request_id}"

    def chunk(choices: list, **extra: Any) -> bytes:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices, **extra})

    try:
        async for ev in events:
            acc.feed(ev)
            kind = ev.get("ev")
            if kind == "start":
                for i in range(acc.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            elif kind == "delta":
                lp = _chat_logprobs(ev["logprobs"]) if "logprobs" in req.sampling and ev.get("logprobs") else None
                yield chunk([{"index": ev["index"], "delta": {"content": ev.get("text", "")}, "logprobs": lp,
                              "finish_reason": ev.get("finish_reason")}])
        if opts.get("include_usage"):
            yield chunk([], usage=acc.usage)
    except APIError as e:
        yield _sse(e.body())
    yield b"data: [DONE]\n\n"


class ConnectionCap:
    """Open HTTP connections, in total and per client IP (pure bookkeeping, no I/O)."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_ip: int = MAX_CONNECTIONS_PER_IP) -> None:
        self.total, self.per_ip = total, per_ip
        self.open: dict[str, int] = {}
        self.count = 0
        self.refused = 0

    def enter(self, ip: str) -> bool:
        if self.count >= self.total or self.open.get(ip, 0) >= self.per_ip:
            self.refused += 1
            return False
        self.count += 1
        self.open[ip] = self.open.get(ip, 0) + 1
        return True

    def leave(self, ip: str) -> None:
        self.count -= 1
        if self.open.get(ip, 0) <= 1:
            self.open.pop(ip, None)
        else:
            self.open[ip] -= 1


_BUSY = json.dumps(APIError(503, "too many open connections; retry shortly", retryable=True).body()).encode()
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Retry-After: 1\r\nContent-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)
_cap_log_at = [0.0]


def _install_connection_cap() -> None:
    """Make hypercorn's trio worker run connections through :class:`_CappedTCPServer` (it builds
    ``TCPServer`` by name and has no connection limit). Servers whose config has no ``molink_cap``
    are unaffected."""
    from hypercorn.trio import run as hc_run
    from hypercorn.trio.tcp_server import TCPServer

    if getattr(hc_run.TCPServer, "_molink_capped", False):
        return

    class _CappedTCPServer(TCPServer):
        _molink_capped = True

        async def run(self) -> None:
            cap: ConnectionCap | None = getattr(self.config, "molink_cap", None)
            if cap is None:
                return await super().run()
            try:
                ip = str(self.stream.socket.getpeername()[0])
            except (AttributeError, OSError):
                ip = "?"
            if not cap.enter(ip):
                if time.monotonic() - _cap_log_at[0] > 10:
                    _cap_log_at[0] = time.monotonic()
                    log.warning("HTTP connection refused: %d open (%d from %s); limits %d total, %d per address",
                                cap.count, cap.open.get(ip, 0), ip, cap.total, cap.per_ip)
                with contextlib.suppress(Exception), trio.move_on_after(1):
                    await self.stream.send_all(_BUSY_RESPONSE)
                with contextlib.suppress(Exception):
                    await self.stream.aclose()
                return
            try:
                await super().run()
            finally:
                cap.leave(ip)

        async def _read_data(self) -> None:
            await super()._read_data()
            # the client is gone: hypercorn would keep the connection (and its slot) until the idle
            # timer fires (IDLE_TIMEOUT later); end it now
            await self.idle_task.stop()

    hc_run.TCPServer = _CappedTCPServer


async def serve_http(app: QuartTrio, bind: str, *, cap: ConnectionCap | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` with Hypercorn on this trio loop; ``task_status.started(bound_urls)``.

    Connections are capped (``cap``, default :class:`ConnectionCap`); idle ones (no request in flight,
    including one still trickling its headers, max 16 KiB of them) close after IDLE_TIMEOUT; a body must
    arrive within BODY_TIMEOUT. A response streams as long as the generation runs."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    _install_connection_cap()
    cfg = Config()
    cfg.bind = [bind]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.keep_alive_timeout = IDLE_TIMEOUT
    cfg.graceful_timeout = 2
    cfg.backlog = 256
    cfg.molink_cap = cap or ConnectionCap()
    await serve(app, cfg, task_status=task_status)
