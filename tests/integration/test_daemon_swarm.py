"""Real molinkd daemons forming a swarm on loopback (gateways need no engine, so these are quick)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import Daemon, boot_addr, free_port, wait_for


def _peer_ids(d: Daemon) -> set[str]:
    st = d.status()
    return {p["peer_id"] for p in st["peers"]} - {st["peer_id"]}


def test_gateways_join_expire_and_restart_with_same_id(tmp_path):
    daemons: list[Daemon] = []
    try:
        a = Daemon(["--layers", "none"], tmp_path, name="a")
        daemons.append(a)
        boot = boot_addr(a)
        b = Daemon(["--layers", "none", "--bootstrap", boot], tmp_path, name="b")
        c = Daemon(["--layers", "none", "--bootstrap", boot], tmp_path, name="c")
        daemons += [b, c]
        ids = {x.name: wait_for(lambda x=x: x.status()["peer_id"], 30, "peer id") for x in (a, b, c)}
        # every peer sees the two others within seconds (b and c learn of each other through a)
        for x in (a, b, c):
            others = {ids[n] for n in ids if n != x.name}
            wait_for(lambda x=x, others=others: others <= _peer_ids(x), 20, f"{x.name} to see the swarm")
        st = b.status()
        assert st["bootstrap"][0]["connected"] is True
        rec = next(p for p in st["peers"] if p["peer_id"] == ids["a"])
        assert rec["layers"] == [0, 0] and rec["model_hash"] == st["model"]["hash"]
        # killed without a goodbye: expires from the others' tables after the TTL (~3 periods)
        expired = a.status()["discovery"]["expired"]
        c.kill()
        t0 = time.monotonic()
        wait_for(lambda: ids["c"] not in _peer_ids(a) and ids["c"] not in _peer_ids(b), 60, "c to expire")
        assert time.monotonic() - t0 >= 2.0  # not instantly: it had to time out
        wait_for(lambda: a.status()["discovery"]["expired"] > expired, 30, "a to count the expiry")
        # restart with the same identity file: same peer id, back in the table
        c2 = Daemon(["--layers", "none", "--bootstrap", boot], tmp_path, name="c")
        daemons.append(c2)
        assert wait_for(lambda: c2.status()["peer_id"], 30, "c2 peer id") == ids["c"]
        wait_for(lambda: ids["c"] in _peer_ids(a), 60, "c to come back")
        # a clean stop announces "offline": the others remove it on that record (counted as such),
        # not by expiry
        before = a.status()["discovery"]
        c2.stop()
        wait_for(lambda: ids["c"] not in _peer_ids(a), 60, "c's offline record to remove it")
        after = a.status()["discovery"]
        assert after["removed_offline"] == before["removed_offline"] + 1, (before, after)
        assert after["expired"] == before["expired"], (before, after)
    finally:
        for x in daemons:
            x.stop()


def test_unreachable_bootstrap_keeps_running_and_says_so(tmp_path):
    dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/12D3KooWAEaJJo4KbJ1qXUmyFdTykAX4sSbTmzBHh6NdfL3CJL92"
    d = Daemon(["--layers", "none", "--bootstrap", dead], tmp_path, name="lonely")
    try:
        st = wait_for(lambda: (s := d.status())["bootstrap"] and s["bootstrap"][0].get("attempts", 0) >= 2 and s,
                   30, "bootstrap retries")
        b = st["bootstrap"][0]
        assert b["connected"] is False and b["last_error"]
        assert d.proc.poll() is None
        r = httpx.post(d.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "no head" in r.json()["error"]["message"]
    finally:
        d.stop()


@pytest.mark.slow
def test_gateway_forwards_to_head(single_node, tmp_path):
    boot = boot_addr(single_node)
    g = Daemon(["--layers", "none", "--bootstrap", boot, "--served-model-name", "my-smol"], tmp_path, name="gw",
               api_key=single_node.api_key)
    try:
        wait_for(lambda: g.status()["ready"], 30, "gateway to find the head")
        h = {"Authorization": f"Bearer {single_node.api_key}"}
        # --served-model-name: the name this peer's API serves under
        assert [m["id"] for m in httpx.get(g.url + "/v1/models", headers=h).json()["data"]] == ["my-smol"]
        r = httpx.post(g.url + "/v1/completions", json={"model": "my-smol", "prompt": "Hi", "max_tokens": 2},
                       headers=h, timeout=120)
        assert r.status_code == 200 and r.json()["model"] == "my-smol", r.text
        r = httpx.post(g.url + "/v1/completions", json={"model": "gpt-4", "prompt": "Hi", "max_tokens": 2},
                       headers=h, timeout=120)
        assert r.status_code == 404
        body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
        direct = httpx.post(single_node.url + "/generate", json=body, headers=h, timeout=120).json()
        via = httpx.post(g.url + "/generate", json=body, headers=h, timeout=120).json()
        assert via == direct
        r = httpx.post(g.url + "/v1/completions", json={**body, "stream": True}, headers=h, timeout=120)
        lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        text = "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1] if json.loads(x)["choices"])
        assert body["prompt"] + text == direct["text"][0]
        # errors found on the head come back with their status
        r = httpx.post(g.url + "/generate", json={"prompt": "x", "max_tokens": 5000}, headers=h, timeout=60)
        assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
        st = g.status()
        assert st["role"] == "gateway" and any(p["layers"] == [0, 30] for p in st["peers"])
        # a head that hangs mid-stream (its daemon stopped, SIGSTOP): the gateway notices the silence,
        # waits for a head to serve again, and when the head comes back (SIGCONT, once the gateway
        # has given it up) resumes the request there: the stream ends normally, with every token
        n_tok = 200
        waker = None
        woke: dict = {}

        def wake_when_given_up() -> None:
            try:
                wait_for(lambda: g.status()["resumed_requests"] >= 1, 180, "the gateway to give up the hung head")
                woke["ok"] = True
            finally:
                os.kill(single_node.proc.pid, signal.SIGCONT)

        with httpx.stream("POST", g.url + "/v1/completions", headers=h, timeout=300,
                          json={"prompt": "Tell me a story", "max_tokens": n_tok, "ignore_eos": True,
                                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = []
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(single_node.proc.pid, signal.SIGSTOP)
                    waker = threading.Thread(target=wake_when_given_up)
                    waker.start()
        waker.join(timeout=200)
        assert woke.get("ok"), "the gateway never noticed the hung head"
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not [c for c in chunks if "error" in c], [c for c in chunks if "error" in c]
        assert chunks[-1]["usage"]["completion_tokens"] == n_tok, chunks[-1]
        assert g.status()["resumed_requests"] == 1
        wait_for(lambda: single_node.status()["active_requests"] == 0, 30, "the head to drop the request")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(single_node.proc.pid, signal.SIGCONT)
        g.stop()


def test_swarm_key_and_announce_on_daemons(tmp_path):
    """--swarm-key: daemons with the same key form a swarm; another key or none cannot join.
    --announce: the announced address comes first in the peer's record, as others see it."""
    from p2p.host import write_swarm_key

    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    write_swarm_key(k1)
    write_swarm_key(k2)
    listen_port = free_port()
    forwarded = f"/ip4/127.0.0.1/tcp/{free_port()}"  # a port forward that nobody needs to dial here
    daemons: list[Daemon] = []
    try:
        a = Daemon(["--layers", "none", "--swarm-key", str(k1), "--listen", f"/ip4/127.0.0.1/tcp/{listen_port}",
                    "--announce", forwarded], tmp_path, name="a")
        daemons.append(a)
        a_id = wait_for(lambda: a.status()["peer_id"], 30, "a's peer id")
        assert a.status()["addrs"][0] == f"{forwarded}/p2p/{a_id}"
        boot = f"/ip4/127.0.0.1/tcp/{listen_port}/p2p/{a_id}"
        b = Daemon(["--layers", "none", "--swarm-key", str(k1), "--bootstrap", boot], tmp_path, name="b")
        c = Daemon(["--layers", "none", "--swarm-key", str(k2), "--bootstrap", boot], tmp_path, name="c")
        d = Daemon(["--layers", "none", "--bootstrap", boot], tmp_path, name="d")
        daemons += [b, c, d]
        wait_for(lambda: a_id in _peer_ids(b), 60, "b (same key) to join a")
        rec = next(p for p in b.status()["peers"] if p["peer_id"] == a_id)
        assert rec["addrs"][0] == f"{forwarded}/p2p/{a_id}", rec["addrs"]
        b_id = b.status()["peer_id"]
        for outsider in (c, d):
            wait_for(lambda o=outsider: (s := o.status()["bootstrap"]) and s[0].get("attempts", 0) >= 2, 60,
                     f"{outsider.name} to retry its bootstrap")
            st = outsider.status()
            assert st["bootstrap"][0]["connected"] is False and not _peer_ids(outsider)
            assert st["peer_id"] not in _peer_ids(a) | _peer_ids(b)
        assert _peer_ids(a) == {b_id}
    finally:
        for x in daemons:
            x.stop()
