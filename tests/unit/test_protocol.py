import pytest

from molinkd.protocol import APIError, GenerationRequest, check_model_name, parse_chat, parse_completion, parse_generate


def test_generate_defaults_like_vllm_demo():
    r = parse_generate({"prompt": "hi"})
    assert r.kind == "generate" and r.prompt == "hi" and r.max_tokens == 16 and not r.stream
    assert r.sampling["temperature"] == 1.0 and r.sampling["n"] == 1


def test_sampling_fields_carried():
    r = parse_completion({"prompt": [1, 2, 3], "temperature": 0, "top_p": 0.5, "top_k": -1, "stop": "x",
                          "seed": 3, "n": 2, "ignore_eos": True, "logprobs": 2, "presence_penalty": 0.5,
                          "logit_bias": {"5": 1.5}, "min_tokens": 2})
    assert r.prompt is None and r.prompt_token_ids == [1, 2, 3]
    s = r.sampling
    assert s["top_k"] == 0 and s["stop"] == ["x"] and s["seed"] == 3 and s["n"] == 2 and s["ignore_eos"]
    assert s["logprobs"] == 2 and s["logit_bias"] == {5: 1.5} and s["min_tokens"] == 2


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "'n'"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": ["a", "b"]}, "batched"),
    ({"prompt": [-1]}, "non-negative"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "not supported"),
    ({}, "required"),
])
def test_completion_rejects(body, needle):
    with pytest.raises(APIError) as e:
        parse_completion(body)
    assert e.value.status == 400 and needle in e.value.message


def test_chat_parsing():
    r = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
                    "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 5})
    assert r.messages == [{"role": "user", "content": "ab"}]
    assert r.sampling["logprobs"] == 2 and r.max_tokens == 5
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).max_tokens is None
    with pytest.raises(APIError, match="top_logprobs"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})


def test_model_name_check():
    check_model_name({"model": "default"}, "m")
    check_model_name({}, "m")
    with pytest.raises(APIError) as e:
        check_model_name({"model": "other"}, "m")
    assert e.value.status == 404


def test_wire_round_trip_revalidates():
    r = parse_completion({"prompt": "x", "logit_bias": {"3": 1}, "logprobs": 1, "seed": 1})
    back = GenerationRequest.from_wire(r.to_wire())
    assert back == r
    bad = r.to_wire()
    bad["sampling"]["temperature"] = -5
    with pytest.raises(APIError):
        GenerationRequest.from_wire(bad)
    with pytest.raises(APIError, match="unknown"):
        GenerationRequest.from_wire({**r.to_wire(), "evil": 1})
