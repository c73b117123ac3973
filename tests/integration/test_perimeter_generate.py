"""Hostile peers against a real head's ``/molink/generate/1`` (the shared single_node daemon, which has
an API key), driven from bare py-libp2p hosts in this process. Each attack is refused or contained
while an honest peer's request, signed with the key, is served."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
import trio

from molinkd.forward import ALIVE, DONE, ERROR, EVENT, MAX_PER_PEER, PROTOCOL, REQUEST, request_mac
from molinkd.protocol import parse_completion
from p2p.framing import FrameError
from p2p.host import NodeConfig, open_node
from p2p.streams import StreamClosed
from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.slow
LOCAL = ("/ip4/127.0.0.1/tcp/0",)


def head_info(d) -> dict:
    st = d.status()
    return {"peer": st["peer_id"], "addrs": [a for a in st["addrs"] if "/127.0.0.1/" in a],
            "hash": st["model"]["hash"]}


def completion(prompt: str = "The capital of France is", **kw: Any) -> dict:
    return parse_completion({"prompt": prompt, "temperature": 0, **kw}).to_wire()


async def ask(node, head: dict, req: dict | None = None, *, key: str | None = API_KEY, body: dict | None = None,
              raw: bytes | None = None, timeout: float = 120) -> tuple[str, Any]:
    """One generate request: ("done", text) or ("error", status) or ("closed", reason)."""
    fs = await node.open_stream(head["peer"], PROTOCOL, head["addrs"], timeout=10)
    try:
        if body is None and raw is None:
            body = {"req": req or completion(max_tokens=8), "model_hash": head["hash"]}
            if key is not None:
                body["auth"] = request_mac(key, node.peer_id, head["peer"])
        try:
            with trio.fail_after(timeout):
                await (fs.send_raw(raw) if raw is not None else fs.send(REQUEST, body))
        except (StreamClosed, ConnectionError) as e:  # the head stopped reading (an oversized frame)
            return "closed", str(e)
        text = ""
        with trio.fail_after(timeout):
            while True:
                try:
                    frame = await fs.recv()
                except (StreamClosed, FrameError) as e:
                    return "closed", str(e)
                if frame.type == ALIVE:
                    continue
                if frame.type == EVENT and frame.body.get("ev") == "delta":
                    text += frame.body["text"]
                elif frame.type == DONE:
                    return "done", text
                elif frame.type == ERROR:
                    return "error", frame.body["status"]
    finally:
        await fs.close()


def http_reference(d, prompt: str, max_tokens: int) -> str:
    r = httpx.post(d.url + "/v1/completions", headers=d.headers, timeout=120,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def test_generate_requires_the_api_key(single_node) -> None:
    head = head_info(single_node)
    expected = http_reference(single_node, "The capital of France is", 8)
    async with open_node(NodeConfig(listen=LOCAL)) as peer:
        assert await ask(peer, head, key=None) == ("error", 401)
        assert await ask(peer, head, key="wrong-key") == ("error", 401)
        # a MAC another asker made is useless from this peer (the asker is the authenticated peer id)
        forged = {"req": completion(max_tokens=8), "model_hash": head["hash"],
                  "auth": request_mac(API_KEY, "12D3KooWSomeoneElseEntirely", head["peer"])}
        assert await ask(peer, head, body=forged) == ("error", 401)
        assert await ask(peer, head) == ("done", expected)


async def test_per_peer_concurrency_cap_while_an_honest_peer_is_served(single_node) -> None:
    head = head_info(single_node)
    expected = http_reference(single_node, "The capital of France is", 8)
    long = completion("Once upon a time", max_tokens=64, ignore_eos=True)
    async with open_node(NodeConfig(listen=LOCAL)) as greedy, open_node(NodeConfig(listen=LOCAL)) as honest:
        results: list[tuple[str, Any]] = []
        honest_result: list[tuple[str, Any]] = []

        async def one() -> None:
            results.append(await ask(greedy, head, long))

        async with trio.open_nursery() as n:
            for _ in range(MAX_PER_PEER + 4):
                n.start_soon(one)
            await trio.sleep(1.0)  # the greedy peer's requests are running
            honest_result.append(await ask(honest, head))
        assert honest_result == [("done", expected)]
        assert results.count(("error", 429)) == 4, results
        assert sum(1 for r in results if r[0] == "done") == MAX_PER_PEER


async def test_oversized_slow_and_out_of_range_requests_are_refused(single_node) -> None:
    head = head_info(single_node)
    expected = http_reference(single_node, "The capital of France is", 8)
    async with open_node(NodeConfig(listen=LOCAL)) as bad, open_node(NodeConfig(listen=LOCAL)) as honest:
        slow_result: list[Any] = []

        async def slowloris() -> None:
            # a stream that never sends its request: closed at the head's first-frame deadline
            fs = await bad.open_stream(head["peer"], PROTOCOL, head["addrs"])
            t0 = trio.current_time()
            with trio.fail_after(30):
                with pytest.raises((StreamClosed, FrameError)):
                    await fs.recv()
            slow_result.append(trio.current_time() - t0)
            await fs.close()

        async with trio.open_nursery() as n:
            n.start_soon(slowloris)
            # a 5 MiB frame (over the 4 MiB limit): the stream ends without an answer
            big = {"req": completion("x" * (5 << 20)), "model_hash": head["hash"],
                   "auth": request_mac(API_KEY, bad.peer_id, head["peer"])}
            status, _ = await ask(bad, head, body=big)
            assert status == "closed"
            # an announced length over the limit, with no body behind it
            status, _ = await ask(bad, head, raw=(8 << 20).to_bytes(4, "big") + os.urandom(16))
            assert status == "closed"
            # under the frame limit but unable to fit the context: refused before tokenizing
            assert await ask(bad, head, completion("x" * (3 << 20))) == ("error", 400)
            for bad_req in (dict(completion(), max_tokens=10**9),
                            dict(completion(), sampling=dict(completion()["sampling"], n=17)),
                            dict(completion(), sampling=dict(completion()["sampling"], logprobs=21))):
                assert await ask(bad, head, bad_req) == ("error", 400)
            assert await ask(honest, head) == ("done", expected)
        assert slow_result and 5 <= slow_result[0] <= 20
