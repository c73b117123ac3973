"""Prefill pacing (molinkd/engine/pacing.py): prompt chunks sized from measured step costs so that
decoding requests keep their pace while a long prompt is prefilled."""

from __future__ import annotations

import pytest

from molinkd.engine.pacing import ASSUMED_STEP_TOKENS, SLACK_ENV, PrefillPacer, prompt_tokens_of, slack_from_env


def test_no_cap_until_a_decode_step_was_measured_or_when_pacing_is_off():
    p = PrefillPacer()
    assert p.chunk() is None
    p.observe(128, 0.5)  # a prompt step before any decode step teaches nothing
    assert p.per_token_s is None and p.chunk() is None
    p.observe(0, 0.040)
    assert p.chunk() is not None
    p.slack = 0
    assert p.chunk() is None


def test_before_a_prompt_token_is_measured_a_step_of_assumed_tokens_would_double_a_step():
    p = PrefillPacer(slack=0.5)
    p.observe(0, 0.040)
    assert p.chunk() == int(0.5 * ASSUMED_STEP_TOKENS)


def test_the_chunk_keeps_a_steps_stretch_within_the_slack():
    p = PrefillPacer(slack=0.5, alpha=1.0)
    p.observe(0, 0.040)  # decode-only steps: 40 ms
    p.observe(32, 0.040 + 32 * 0.002)  # 2 ms per prompt token
    assert p.per_token_s == pytest.approx(0.002)
    assert p.chunk() == p.floor == 16  # 0.5 * 40 ms / 2 ms = 10: below the floor
    p.observe(32, 0.040 + 32 * 0.0002)  # a faster machine: 0.2 ms per token
    assert p.chunk() in (99, 100)  # 0.5 * 40 ms / 0.2 ms
    # the stretch a chunk adds (per token * chunk) stays within slack of a decode step
    assert p.per_token_s * p.chunk() <= p.slack * p.step_s + 1e-9


def test_decode_steps_and_prompt_steps_are_told_apart():
    p = PrefillPacer(alpha=1.0)
    p.observe(0, 0.030)
    p.observe(64, 0.100)  # a prompt step does not move the decode step time
    assert p.step_s == pytest.approx(0.030)
    p.observe(64, 0.010)  # faster than a decode step (noise): a rate of 0, not negative
    assert p.per_token_s == 0.0
    assert p.chunk() == int(p.slack * ASSUMED_STEP_TOKENS)  # a free prompt token is not believed
    p.observe(-1, 0.1)
    p.observe(0, -0.1)
    assert p.step_s == pytest.approx(0.030)


def test_prompt_tokens_of_a_step():
    assert prompt_tokens_of({"a": 1, "b": 1}) == 0
    assert prompt_tokens_of({"a": 1, "long": 48, "c": 7}) == 55


def test_slack_from_the_environment(monkeypatch):
    monkeypatch.delenv(SLACK_ENV, raising=False)
    assert slack_from_env() == 0.5
    monkeypatch.setenv(SLACK_ENV, "0")
    assert slack_from_env() == 0.0
    monkeypatch.setenv(SLACK_ENV, "-1")
    with pytest.raises(ValueError, match="0 turns prefill pacing off"):
        slack_from_env()
    monkeypatch.setenv(SLACK_ENV, "lots")
    with pytest.raises(ValueError, match=SLACK_ENV):
        slack_from_env()
