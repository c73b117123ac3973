"""Generation events that come off the network are checked before the HTTP layer trusts them."""

from __future__ import annotations

import pytest

from molinkd.forward import check_event
from p2p.framing import FrameError

START = {"ev": "start", "prompt": "p", "prompt_tokens": 2, "n": 1}


def test_good_events_pass() -> None:
    assert check_event(START) == START
    assert check_event({**START, "prompt_token_ids": [1, 2]})["prompt_token_ids"] == [1, 2]
    check_event({"ev": "delta", "index": 0, "text": "x", "token_ids": [5], "logprobs": None, "finish_reason": None})
    check_event({"ev": "end", "prompt_tokens": 2, "completion_tokens": 1})


@pytest.mark.parametrize("ev", [
    "not a dict",
    {"ev": "surprise"},
    {"ev": "start", "prompt": "p", "n": 1},  # missing prompt_tokens
    {**START, "n": 0},
    {**START, "prompt_token_ids": "1 2"},
    {**START, "prompt_token_ids": [1, -2]},
    {**START, "prompt_token_ids": [1, True]},
    {"ev": "delta", "index": 0, "text": "x", "token_ids": ["5"], "logprobs": None, "finish_reason": None},
    {"ev": "end", "prompt_tokens": "2", "completion_tokens": 1},
])
def test_malformed_events_are_refused(ev: object) -> None:
    with pytest.raises(FrameError):
        check_event(ev)
