"""How the local backend turns vLLM's outputs into events: an answer the engine cut short (vLLM's
"abort" when the engine stops, or an output stream that ends early) is a retryable error, never a
finished answer (real vLLM ``CompletionOutput`` objects)."""

from __future__ import annotations

import pytest

from molinkd.engine.driver import ENGINE_ABORTED, check_all_finished, delta_event
from molinkd.protocol import APIError
from vllm.outputs import CompletionOutput


def out(finish: str | None, tokens=(5, 6)) -> CompletionOutput:
    return CompletionOutput(index=0, text="ab", token_ids=list(tokens), cumulative_logprob=None, logprobs=None,
                            finish_reason=finish)


def test_deltas_pass_through_with_their_finish_reason():
    assert delta_event(out(None), 0) == {"ev": "delta", "index": 0, "text": "ab", "token_ids": [5, 6],
                                         "logprobs": None, "finish_reason": None}
    assert delta_event(out("length"), 0)["finish_reason"] == "length"


def test_an_engine_abort_is_a_retryable_error():
    with pytest.raises(APIError) as e:
        delta_event(out("abort"), 0)
    assert e.value.retryable and e.value.status == 503 and e.value.message == ENGINE_ABORTED


def test_an_output_stream_ending_early_is_a_retryable_error():
    check_all_finished({0, 1}, 2)
    with pytest.raises(APIError, match="1 of 2 choice") as e:
        check_all_finished({1}, 2)
    assert e.value.retryable
