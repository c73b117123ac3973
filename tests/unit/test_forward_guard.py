"""The head's guard on /molink/generate/1: authorization, size bounds before tokenizing, per-peer slots."""

from __future__ import annotations

import pytest

from molinkd.forward import GenerateGuard, check_request_size, request_mac
from molinkd.protocol import APIError, GenerationRequest, parse_chat, parse_completion

ASKER, HEAD, OTHER_HEAD = "12D3KooWasker", "12D3KooWhead", "12D3KooWother"


def test_mac_binds_key_asker_and_head() -> None:
    mac = request_mac("k", ASKER, HEAD)
    assert mac == request_mac("k", ASKER, HEAD) and len(mac) == 64
    assert mac != request_mac("k2", ASKER, HEAD)
    assert mac != request_mac("k", HEAD, ASKER)
    assert mac != request_mac("k", ASKER, OTHER_HEAD)  # a MAC shown to one head is useless at another
    assert "k" not in mac


def test_api_key_required_when_set() -> None:
    g = GenerateGuard(HEAD, api_key="secret")
    g.authorize(ASKER, {"auth": request_mac("secret", ASKER, HEAD)})
    for body in ({}, {"auth": None}, {"auth": "secret"}, {"auth": request_mac("wrong", ASKER, HEAD)},
                 {"auth": request_mac("secret", ASKER, OTHER_HEAD)}, "not a map"):
        with pytest.raises(APIError) as e:
            g.authorize(ASKER, body)
        assert e.value.status == 401 and "--api-key" in e.value.message
    # a MAC made for another asker does not work from this one (the asker id is the authenticated peer)
    with pytest.raises(APIError):
        g.authorize(OTHER_HEAD, {"auth": request_mac("secret", ASKER, HEAD)})
    GenerateGuard(HEAD).authorize(ASKER, {})  # no key set: no auth needed


def test_allow_list_predicate() -> None:
    g = GenerateGuard(HEAD, peer_allowed=lambda p: p == ASKER)
    g.authorize(ASKER, {})
    with pytest.raises(APIError) as e:
        g.authorize(OTHER_HEAD, {})
    assert e.value.status == 403


def test_per_peer_slots() -> None:
    g = GenerateGuard(HEAD, max_per_peer=2)
    with g.slot(ASKER), g.slot(ASKER):
        with pytest.raises(APIError) as e:
            g.check_slot(ASKER)
        assert e.value.status == 429 and e.value.retryable
        g.check_slot(OTHER_HEAD)  # other peers are not affected
    g.check_slot(ASKER)
    assert not g.active


def test_size_checked_before_tokenizing() -> None:
    ok = parse_completion({"prompt": "x" * 1000, "max_tokens": 10})
    check_request_size(ok, 2048)
    with pytest.raises(APIError, match="characters"):
        check_request_size(parse_completion({"prompt": "x" * (2048 * 128 + 1)}), 2048)
    with pytest.raises(APIError, match="characters"):
        check_request_size(parse_chat({"messages": [{"role": "user", "content": "y" * 300_000}]}), 2048)
    with pytest.raises(APIError, match="the prompt has 2048"):
        check_request_size(GenerationRequest(kind="completion", prompt_token_ids=[1] * 2048), 2048)
    with pytest.raises(APIError, match="max_tokens"):
        check_request_size(parse_completion({"prompt": "x", "max_tokens": 4096}), 2048)
