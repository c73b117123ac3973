"""A real single-node daemon (real vLLM engine on the embedded model, real HTTP on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import REPO
from tests.integration.conftest import API_KEY, CHAT, MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.slow


def client(d) -> httpx.Client:
    return httpx.Client(base_url=d.url, headers=d.headers, timeout=120)


def test_greedy_generate_equals_plain_vllm(single_node, plain_vllm_outputs):
    with client(single_node) as c:
        for prompt, expected in zip(PROMPTS, plain_vllm_outputs):
            r = c.post("/generate", json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["text"] == [prompt + expected]
            r = c.post("/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": 24,
                                                "temperature": 0})
            assert r.json()["choices"][0]["text"] == expected


def test_generate_stream_is_cumulative_nul_separated(single_node):
    with client(single_node) as c:
        with c.stream("POST", "/generate", json={"prompt": "The capital of France is", "max_tokens": 6,
                                                 "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            raw = b"".join(r.iter_bytes())
    chunks = [json.loads(x) for x in raw.split(b"\0") if x]
    assert len(chunks) >= 2
    texts = [ch["text"][0] for ch in chunks]
    assert all(t.startswith("The capital of France is") for t in texts)
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    final = client(single_node).post("/generate", json={"prompt": "The capital of France is", "max_tokens": 6,
                                                        "temperature": 0, "ignore_eos": True}).json()["text"][0]
    assert texts[-1] == final


def _sse(raw: str) -> list:
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completions_stream_matches_non_stream_and_usage(single_node):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "The three primary colors are", "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    with client(single_node) as c:
        full = c.post("/v1/completions", json=body).json()
        r = c.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert text == full["choices"][0]["text"]
    assert chunks[-1]["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == 12
    assert full["usage"]["total_tokens"] == full["usage"]["prompt_tokens"] + 12
    assert full["object"] == "text_completion"


def test_chat_completion_and_stream(single_node, plain_vllm):
    body = {"model": "default", "messages": CHAT[0], "max_tokens": 16, "temperature": 0}
    with client(single_node) as c:
        full = c.post("/v1/chat/completions", json=body).json()
        r = c.post("/v1/chat/completions", json={**body, "stream": True})
    msg = full["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == plain_vllm["chat"][0]  # plain vLLM's LLM.chat
    chunks = _sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert streamed == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert full["usage"]["prompt_tokens"] > 10  # the chat template wraps the message


def test_models_and_health_and_status(single_node):
    with client(single_node) as c:
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
        st = c.get("/status").json()
    assert st["layers"] == [0, 30]
    assert st["model"]["num_layers"] == 30
    assert "peers" in st and "addrs" in st and "peer_id" in st
    # /health needs no API key
    assert httpx.get(single_node.url + "/health").status_code == 200


def test_api_key_required(single_node):
    r = httpx.post(single_node.url + "/generate", json={"prompt": "x"})
    assert r.status_code == 401
    assert "API key" in r.json()["error"]["message"]
    r = httpx.post(single_node.url + "/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_n_seed_stop_ignore_eos_logprobs(single_node, plain_vllm_outputs):
    with client(single_node) as c:
        body = {"prompt": "Once upon a time", "max_tokens": 10, "n": 3, "temperature": 1.0, "seed": 7,
                "ignore_eos": True}
        r = c.post("/v1/completions", json=body).json()
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2]
        again = c.post("/v1/completions", json=body).json()
        assert [ch["text"] for ch in r["choices"]] == [ch["text"] for ch in again["choices"]]
        assert len({ch["text"] for ch in r["choices"]}) > 1  # three samples, not one repeated
        assert r["usage"]["completion_tokens"] == 30
        # ignore_eos: exactly max_tokens tokens
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 40, "temperature": 0,
                                            "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 40
        # logprobs: the greedy tokens are the reference's first tokens, each the likeliest of its top 2
        ref = plain_vllm_outputs[0]
        r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3,
                                            "temperature": 0, "logprobs": 2}).json()
        lp = r["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3
        assert "".join(lp["tokens"]) == r["choices"][0]["text"] and ref.startswith(r["choices"][0]["text"])
        assert all(len(t) == 2 for t in lp["top_logprobs"])
        for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert logprob == pytest.approx(max(top.values())) and top[tok] == pytest.approx(logprob)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                 "temperature": 0, "logprobs": True, "top_logprobs": 3,
                                                 "ignore_eos": True}).json()
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 3 and all(len(x["top_logprobs"]) == 3 for x in content)


def _stop_string(ref: str) -> tuple[str, int]:
    """A stop string taken from the middle of the reference continuation, and where it first occurs."""
    for k in range(len(ref) // 2, len(ref) - 2):
        stop = ref[k:k + 2]
        if stop.strip():
            return stop, ref.index(stop)
    raise AssertionError(f"the reference continuation is too short for a stop string: {ref!r}")


def test_stop_strings_against_the_reference(single_node, plain_vllm_outputs):
    """stop / include_stop_str_in_output, with the stop string cut from the reference continuation
    (computed on this machine): the answer is the reference up to it."""
    ref = plain_vllm_outputs[0]
    stop, at = _stop_string(ref)
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]}
    with client(single_node) as c:
        r = c.post("/v1/completions", json=body).json()
        assert r["choices"][0]["text"] == ref[:at] and r["choices"][0]["finish_reason"] == "stop", (stop, ref)
        r = c.post("/v1/completions", json={**body, "include_stop_str_in_output": True}).json()
        assert r["choices"][0]["text"] == ref[:at + len(stop)]


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/generate", b"{not json", 400, "not valid JSON"),
        ("/generate", b"", 400, "empty"),
        ("/generate", b"[1,2]", 400, "JSON object"),
        ("/generate", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/generate", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/generate", {"prompt": "x", "max_tokens": 5000}, 400, "context length"),
        ("/generate", {"max_tokens": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 100}, 400, "'n'"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "sampling"),  # vLLM's own check
        ("/v1/completions", {"prompt": [10 ** 6]}, 400, "vocabulary"),
    ],
)
def test_bad_input(single_node, path, body, status, needle):
    with client(single_node) as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status and err["type"]


def test_too_large_body_then_still_serving(single_node):
    with client(single_node) as c:
        r = c.post("/generate", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert "too large" in r.json()["error"]["message"]
        r = c.post("/generate", json={"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200


def _wait_idle(d, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    st = {}
    while time.monotonic() < deadline:
        st = d.status()
        if st["active_requests"] == 0 and st["engine"].get("unfinished", 0) == 0:
            return st
        time.sleep(0.2)
    raise AssertionError(f"requests still active after client disconnect: {st}")


def test_cancelled_stream_frees_engine_slot(single_node):
    with client(single_node) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "Tell me a story", "max_tokens": 1500,
                                                       "ignore_eos": True, "stream": True}) as r:
            it = r.iter_lines()
            got = 0
            for line in it:
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
            st = single_node.status()
            assert st["active_requests"] >= 1
        # leaving the block closes the connection mid-stream
    st = _wait_idle(single_node)
    assert st["active_requests"] == 0


def test_cancelled_non_stream_request_frees_engine_slot(single_node):
    with httpx.Client(base_url=single_node.url, headers=single_node.headers, timeout=1.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/generate", json={"prompt": "Tell me a story", "max_tokens": 1900, "ignore_eos": True})
    _wait_idle(single_node)


def test_concurrent_requests(single_node):
    results: list = [None] * 8

    def one(i: int) -> None:
        with client(single_node) as c:
            r = c.post("/v1/completions", json={"prompt": f"Number {i} is", "max_tokens": 16, "ignore_eos": True,
                                                "temperature": 0})
            results[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [16] * 8


def test_molink_status_cli(single_node):
    r = subprocess.run([sys.executable, "-m", "cli.molink", "status", "--api", single_node.url, "--json",
                        "--api-key", API_KEY], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"] == [0, 30]
    r = subprocess.run([sys.executable, "-m", "cli.molink", "status", "--api", single_node.url,
                        "--api-key", API_KEY], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0 and "coverage [0,30)" in r.stdout and "complete" in r.stdout


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_sampling_parameters_end_to_end(single_node, plain_vllm_outputs, tokenizer):
    """Each sampling parameter the README lists has its effect through the daemon; every expectation
    is a property (or the same-run reference), not a literal answer."""
    prompt, ref = PROMPTS[0], plain_vllm_outputs[0]
    (the,) = tokenizer(" the", add_special_tokens=False)["input_ids"]
    base = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    with client(single_node) as c:
        def complete(**kw) -> dict:
            r = c.post("/v1/completions", json={**base, **kw})
            assert r.status_code == 200, r.text
            return r.json()

        # echo: the prompt, then the answer
        assert complete(echo=True)["choices"][0]["text"] == prompt + ref
        # min_p=1 and top_k=1 keep only the likeliest token(s): sampling at temperature 1 then picks
        # a likeliest token at every step (bf16 logits tie often, so not always greedy's pick)
        for cut in ({"min_p": 1.0}, {"top_k": 1}):
            lp = complete(temperature=1.0, seed=3, logprobs=1, ignore_eos=True, **cut)["choices"][0]["logprobs"]
            assert len(lp["token_logprobs"]) == MAX_TOKENS
            for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
                assert logprob == pytest.approx(max(top.values()), abs=1e-6), (cut, tok, top)
        # logit_bias: +100 forces a token, -100 forbids the reference's first token
        r = complete(max_tokens=5, ignore_eos=True, logit_bias={str(the): 100})
        assert r["choices"][0]["text"] == tokenizer.decode([the] * 5)
        first = tokenizer(prompt + ref, add_special_tokens=False)["input_ids"][
            len(tokenizer(prompt, add_special_tokens=False)["input_ids"])]
        r = complete(max_tokens=1, ignore_eos=True, logit_bias={str(first): -100})
        assert r["choices"][0]["text"] and not ref.startswith(r["choices"][0]["text"])
        # stop_token_ids: the forced token ends the answer at once (it is not shown)
        r = complete(logit_bias={str(the): 100}, stop_token_ids=[the])
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
        assert r["choices"][0]["text"] == ""
        # min_tokens: stop tokens are held back for 5 tokens, then the forced stop token ends it
        r = complete(logit_bias={str(the): 100}, stop_token_ids=[the], min_tokens=5)
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 6
        # penalties (presence, frequency, repetition at their strong end) change greedy choices
        r = complete(max_tokens=16, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0,
                     repetition_penalty=2.0)
        assert r["usage"]["completion_tokens"] == 16
        penalized = r["choices"][0]["text"]
        plain = complete(max_tokens=16, ignore_eos=True)["choices"][0]["text"]
        assert penalized != plain  # the penalties changed the greedy choice somewhere in 16 tokens
        # tools and suffix are refused with a clear 400
        for extra in ({"suffix": "!"}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
            path = "/v1/completions" if "suffix" in extra else "/v1/chat/completions"
            body = base if "suffix" in extra else {"messages": CHAT[0], "max_tokens": 4}
            r = c.post(path, json={**body, **extra})
            assert r.status_code == 400, r.text
            assert "not supported" in r.json()["error"]["message"]
