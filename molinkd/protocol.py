"""PURE: HTTP request bodies -> validated :class:`GenerationRequest` (no I/O, no vLLM import).

A GenerationRequest is plain data (msgpack-able through :meth:`to_wire`), so a peer that is not a
head can forward it over libp2p unchanged. Errors are :class:`APIError` with an HTTP status and an
OpenAI-style error body.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_STOP_LEN = 256


class APIError(Exception):
    """An error the client caused (or must hear about), with the HTTP status to answer."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type_: str | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        # the serving engine or peer was lost, not the request at fault: it may be resumed
        # elsewhere (see molinkd.resume)
        self.retryable = retryable
        self.type = type_ or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def to_wire(self) -> dict:
        return {"status": self.status, "message": self.message, "param": self.param, "type": self.type,
                "retryable": self.retryable}

    @classmethod
    def from_wire(cls, d: Any) -> "APIError":
        if not isinstance(d, dict):
            return cls(502, "malformed error from the serving peer")
        status = d.get("status")
        if not isinstance(status, int) or not 400 <= status <= 599:
            status = 502
        return cls(status, str(d.get("message", "error")), param=d.get("param"), type_=d.get("type"),
                   retryable=d.get("retryable") is True)


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


@dataclasses.dataclass
class GenerationRequest:
    """What a backend needs to run one generation (one HTTP request, possibly n choices)."""

    kind: str  # "generate" | "completion" | "chat"
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    add_generation_prompt: bool = True
    # Sampling: keys are vLLM SamplingParams fields, validated here.
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    # max_tokens None = "the rest of the context" (chat default); resolved by the backend.
    max_tokens: int | None = 16
    stream: bool = False
    echo: bool = False
    request_id: str = ""

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> "GenerationRequest":
        if not isinstance(d, dict):
            raise bad("malformed forwarded request")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise bad(f"unknown request fields {sorted(map(str, unknown))[:8]}")
        if "kind" not in d:
            raise bad("malformed forwarded request: no 'kind'")
        req = cls(**d)
        # re-validate everything that came off the network, with the checks the HTTP path uses
        if req.kind not in ("generate", "completion", "chat"):
            raise bad(f"unknown request kind {req.kind!r}")
        if req.prompt is not None and not isinstance(req.prompt, str):
            raise bad("'prompt' must be a string")
        if req.prompt_token_ids is not None:
            _token_list(req.prompt_token_ids, "prompt_token_ids")
        if req.messages is not None:
            req.messages = _check_messages(req.messages)
        if req.prompt is None and req.prompt_token_ids is None and req.messages is None:
            raise bad("the forwarded request has no prompt")
        req.max_tokens = _int({"max_tokens": req.max_tokens}, "max_tokens", None, 1)
        for key in ("add_generation_prompt", "stream", "echo"):
            setattr(req, key, _bool({key: getattr(req, key)}, key, False))
        if not isinstance(req.request_id, str) or len(req.request_id) > 128:
            raise bad("'request_id' must be a short string")
        if not isinstance(req.sampling, dict):
            raise bad("'sampling' must be a map")
        _validate_sampling(dict(req.sampling))
        return req


# ---------------------------------------------------------------- field helpers


def _num(body: dict, key: str, default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{key}' must be a number", key)
    if lo is not None and v < lo:
        raise bad(f"'{key}' must be >= {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise bad(f"'{key}' must be <= {hi}, got {v}", key)
    return float(v)


def _int(body: dict, key: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise bad(f"'{key}' must be an integer", key)
    if lo is not None and v < lo:
        raise bad(f"'{key}' must be >= {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise bad(f"'{key}' must be <= {hi}, got {v}", key)
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be true or false", key)
    return v


def _stop(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(v) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in v):
        raise bad(f"'stop' allows at most {MAX_STOP} strings of {MAX_STOP_LEN} characters", "stop")
    return v


def _token_list(v: Any, key: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise bad(f"'{key}' must be a list of non-negative integers", key)
    return v


def _common_sampling(body: dict) -> dict[str, Any]:
    s: dict[str, Any] = {}
    s["temperature"] = _num(body, "temperature", 1.0, 0.0, 100.0)
    s["top_p"] = _num(body, "top_p", 1.0, 0.0, 1.0)
    if s["top_p"] == 0.0:
        raise bad("'top_p' must be in (0, 1]", "top_p")
    top_k = _int(body, "top_k", None, -1)
    if top_k is not None:
        s["top_k"] = 0 if top_k == -1 else top_k  # -1 and 0 both mean "disabled"
    s["min_p"] = _num(body, "min_p", 0.0, 0.0, 1.0)
    s["presence_penalty"] = _num(body, "presence_penalty", 0.0, -2.0, 2.0)
    s["frequency_penalty"] = _num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    s["repetition_penalty"] = _num(body, "repetition_penalty", 1.0, 0.0, 10.0)
    if s["repetition_penalty"] == 0.0:
        raise bad("'repetition_penalty' must be > 0", "repetition_penalty")
    s["n"] = _int(body, "n", 1, 1, MAX_N)
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    if seed is not None:
        s["seed"] = seed
    stop = _stop(body)
    if stop:
        s["stop"] = stop
    if body.get("stop_token_ids") is not None:
        s["stop_token_ids"] = _token_list(body["stop_token_ids"], "stop_token_ids")
    s["ignore_eos"] = _bool(body, "ignore_eos", False)
    s["min_tokens"] = _int(body, "min_tokens", 0, 0)
    s["skip_special_tokens"] = _bool(body, "skip_special_tokens", True)
    s["include_stop_str_in_output"] = _bool(body, "include_stop_str_in_output", False)
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad("'logit_bias' must be a map of token id to bias", "logit_bias")
        try:
            s["logit_bias"] = {int(k): float(v) for k, v in lb.items()}
        except (TypeError, ValueError):
            raise bad("'logit_bias' must map integer token ids to numbers", "logit_bias") from None
        if any(not -100 <= v <= 100 for v in s["logit_bias"].values()):
            raise bad("'logit_bias' values must be in [-100, 100]", "logit_bias")
    for unsupported in ("best_of", "response_format", "guided_json", "guided_regex", "tools", "suffix"):
        v = body.get(unsupported)
        if v is not None and not (unsupported == "response_format" and v == {"type": "text"}) and not (
            unsupported == "best_of" and v == s["n"]
        ):
            raise bad(f"'{unsupported}' is not supported by this server yet", unsupported)
    return s


def _validate_sampling(s: dict) -> None:
    """Re-validate a sampling dict (e.g. one forwarded by another peer)."""
    allowed = {
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "n", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
        "skip_special_tokens", "include_stop_str_in_output", "logit_bias", "logprobs",
    }
    unknown = set(s) - allowed
    if unknown:
        raise bad(f"unknown sampling fields {sorted(unknown)}")
    lb = s.pop("logit_bias", None)
    probe = dict(s)
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad("'logit_bias' must be a map")
        probe["logit_bias"] = {str(k): v for k, v in lb.items()}
    lp = probe.pop("logprobs", None)
    if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= MAX_LOGPROBS):
        raise bad("'logprobs' out of range")
    _common_sampling(probe)
    if lb is not None:
        s["logit_bias"] = lb
    if lp is not None:
        s["logprobs"] = lp


def _body_dict(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


def _prompt(body: dict, key: str = "prompt") -> tuple[str | None, list[int] | None]:
    p = body.get(key)
    if p is None:
        raise bad(f"'{key}' is required", key)
    if isinstance(p, str):
        return p, None
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return p[0], None
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return None, _token_list(p, key)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, str) for x in p):
        raise bad("batched prompts (a list of several strings) are not supported; send one request per prompt", key)
    raise bad(f"'{key}' must be a string or a list of token ids", key)


def _parse_prompt_request(body: Any, kind: str) -> GenerationRequest:
    body = _body_dict(body)
    _check_model(body)
    prompt, ids = _prompt(body)
    s = _common_sampling(body)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    if logprobs is not None:
        s["logprobs"] = logprobs
    return GenerationRequest(
        kind=kind,
        prompt=prompt,
        prompt_token_ids=ids,
        sampling=s,
        max_tokens=_int(body, "max_tokens", 16, 1),
        stream=_bool(body, "stream", False),
        echo=_bool(body, "echo", False) if kind == "completion" else False,
    )


def parse_generate(body: Any) -> GenerationRequest:
    """vLLM demo server ``POST /generate``: prompt + SamplingParams fields at the top level."""
    return _parse_prompt_request(body, "generate")


def parse_completion(body: Any) -> GenerationRequest:
    """OpenAI ``POST /v1/completions``."""
    return _parse_prompt_request(body, "completion")


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_chat(body: Any) -> GenerationRequest:
    body = _body_dict(body)
    _check_model(body)
    messages = _check_messages(body.get("messages"))
    s = _common_sampling(body)
    if _bool(body, "logprobs", False):
        s["logprobs"] = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return GenerationRequest(
        kind="chat",
        messages=messages,
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
        sampling=s,
        max_tokens=_int({"max_tokens": max_tokens}, "max_tokens", None, 1),
        stream=_bool(body, "stream", False),
    )


_model_names: tuple[str, ...] = ()


def _check_model(body: dict) -> None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise bad("'model' must be a string", "model")


def check_model_name(body: Any, served: str) -> None:
    """404 unless ``model`` is absent, the served name, or the alias "default"."""
    if isinstance(body, dict):
        m = body.get("model")
        if m is not None and m not in (served, "default"):
            raise APIError(404, f"model {m!r} does not exist; this swarm serves {served!r} (or say \"default\")",
                           param="model", type_="not_found_error")
