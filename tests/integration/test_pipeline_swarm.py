"""Distributed inference through real daemons: layer spans on different peers, hidden states over
libp2p, routes from live announcements, HTTP on any peer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from tests.helpers import REPO, Daemon, boot_addr, wait_for
from tests.integration.conftest import PROMPTS

pytestmark = pytest.mark.slow


def _start_all(daemons: list[Daemon], timeout: float = 400) -> None:
    for d in daemons:
        d.wait_ready(timeout=timeout)


def _greedy(d: Daemon, prompt: str, max_tokens: int = 24) -> str:
    r = httpx.post(d.url + "/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["text"][0]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_stage")
    stage = Daemon(["--layers", "15:30"], tmp, name="stage")
    daemons = [stage]
    try:
        boot = boot_addr(stage)
        # the head is told nothing but "auto, at most 15 layers": it must pick the gap 0:15
        head = Daemon(["--layers", "auto", "--max-layers", "15", "--bootstrap", boot], tmp, name="head")
        daemons.append(head)
        _start_all([stage, head])
        wait_for(lambda: stage.status()["ready"], 60, "the stage to forward to the head")
        yield head, stage
    finally:
        for d in reversed(daemons):
            d.stop()


def test_two_stage_greedy_equals_single_node_on_head_and_stage(two_stage, plain_vllm_outputs):
    head, stage = two_stage
    for prompt, expected in zip(PROMPTS, plain_vllm_outputs):
        assert _greedy(head, prompt) == prompt + expected
        assert _greedy(stage, prompt) == prompt + expected  # asked on a non-head peer
    prompt, expected = PROMPTS[0], plain_vllm_outputs[0]
    for d in (head, stage):
        r = httpx.post(d.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                        "stream": True}, timeout=300)
        lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == expected
        r = httpx.post(d.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0},
                       timeout=300)
        assert r.json()["choices"][0]["text"] == expected


def test_two_stage_16_concurrent_requests(two_stage):
    head, stage = two_stage
    counts: list = [None] * 16

    def one(i: int) -> None:
        d = head if i % 2 == 0 else stage
        r = httpx.post(d.url + "/v1/completions", json={"prompt": f"Story number {i}:", "max_tokens": 20,
                                                        "ignore_eos": True, "temperature": 0.7, "seed": i},
                       timeout=600)
        counts[i] = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert counts == [20] * 16


def test_two_stage_status_shows_route_and_holder(two_stage):
    head, stage = two_stage
    hs, ss = head.status(), stage.status()
    assert hs["role"] == "head" and ss["role"] == "stage"
    assert hs["route"] == [hs["peer_id"], ss["peer_id"]]
    assert [(h["start"], h["end"]) for h in hs["stages"]] == [(0, 15), (15, 30)]
    assert all(isinstance(h["step_ms"], float) and h["step_ms"] > 0 for h in hs["stages"]), hs["stages"]
    assert hs["pipeline"]["steps"] > 0 and hs["pipeline"]["round_trip_ms"] > 0
    assert ss["serving_head"] == hs["peer_id"]
    assert hs["coverage"]["complete"] is True
    r = subprocess.run([sys.executable, "-m", "cli.molink", "status", "--api", head.url], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0 and "route" in r.stdout and "complete" in r.stdout


def test_half_model_peer_uses_less_memory(two_stage, single_node):
    """Each peer loads only its layers: compare the engine processes' memory right after loading
    (before the KV cache, which is the same 1 GiB everywhere and dwarfs a 135M model)."""
    head, stage = two_stage
    full = single_node.status()["engine"]["loaded_rss_mb"]
    first, second = head.status()["engine"]["loaded_rss_mb"], stage.status()["engine"]["loaded_rss_mb"]
    assert None not in (full, first, second)
    assert second < full * 0.9, (second, full)
    assert stage.status()["engine_rss_mb"] > 0


@pytest.mark.timeout(1800)
def test_two_heads_share_the_swarm(two_stage, tmp_path, plain_vllm_outputs):
    """A second head and a second stage join: each head holds its own stage (one head per stage)."""
    head1, stage1 = two_stage
    boot = boot_addr(stage1)
    stage2 = Daemon(["--layers", "15:30", "--bootstrap", boot], tmp_path, name="stage2")
    head2 = None
    try:
        stage2.wait_ready(timeout=400)
        head2 = Daemon(["--layers", "0:15", "--bootstrap", boot], tmp_path, name="head2")
        head2.wait_ready(timeout=400)
        s1, s2 = stage1.status()["peer_id"], stage2.status()["peer_id"]
        assert head1.status()["route"][1] == s1
        assert head2.status()["route"][1] == s2
        results: dict = {}

        def run(d: Daemon, key: str) -> None:
            results[key] = [_greedy(d, p) for p in PROMPTS[:3]]

        threads = [threading.Thread(target=run, args=(d, k)) for d, k in ((head1, "h1"), (head2, "h2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        expected = [p + e for p, e in zip(PROMPTS[:3], plain_vllm_outputs[:3])]
        assert results["h1"] == expected and results["h2"] == expected
        # a daemon killed outright takes its engine processes with it (no orphaned model in memory):
        # the stage process of a stage, vLLM's EngineCore of a head
        import psutil

        from molinkd import runtime

        for d in (stage2, head2):
            kids = psutil.Process(d.proc.pid).children(recursive=True)
            assert kids
            (rundir,) = runtime.runtime_root().glob(f"{d.proc.pid}-*")
            if d is head2:  # a head's runtime directory holds vLLM's scratch files (IPC sockets, ...)
                assert any((rundir / "tmp").iterdir()), (d.name, list(rundir.rglob("*")))
            os.kill(d.proc.pid, signal.SIGKILL)
            gone, alive = psutil.wait_procs(kids, timeout=20)
            assert not alive, (d.name, alive)
            # the next daemon to start sweeps what the killed one left behind
            assert rundir.exists()
            assert rundir.name in runtime.sweep(runtime.runtime_root())
            assert not rundir.exists()
    finally:
        if head2 is not None:
            head2.stop()
        stage2.stop()


@pytest.mark.timeout(1800)
def test_three_stages_with_spare_and_a_garbage_peer(tmp_path, model_dir, plain_vllm_outputs):
    """0:10, two peers on 10:20, 20:30, and an evil peer announcing 10:20 that answers garbage:
    the head tries it (it claims to be fastest), bans it, and routes through one real 10:20 peer;
    the other is a spare."""
    daemons: list[Daemon] = []
    evil = None
    try:
        c = Daemon(["--layers", "20:30"], tmp_path, name="c")
        daemons.append(c)
        boot = boot_addr(c)
        b1 = Daemon(["--layers", "10:20", "--bootstrap", boot], tmp_path, name="b1")
        b2 = Daemon(["--layers", "10:20", "--bootstrap", boot], tmp_path, name="b2")
        daemons += [b1, b2]
        _start_all([c, b1, b2])
        model_hash = c.status()["model"]["hash"]
        evil = subprocess.Popen([sys.executable, str(REPO / "tests/integration/evil_peer.py"), boot, model_hash,
                                 "10", "20", "600"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = evil.stdout.readline()
        assert line.startswith("READY"), line
        evil_id = line.split()[1]
        wait_for(lambda: evil_id in {p["peer_id"] for p in c.status()["peers"]}, 20, "the evil peer to be seen")
        a = Daemon(["--layers", "0:10", "--bootstrap", boot], tmp_path, name="a")
        daemons.append(a)
        a.wait_ready(timeout=500)
        st = a.status()
        ids = {x.name: x.status()["peer_id"] for x in (b1, b2, c)}
        route = st["route"]
        assert len(route) == 3 and route[0] == st["peer_id"] and route[2] == ids["c"]
        assert route[1] in (ids["b1"], ids["b2"]) and evil_id not in route
        assert evil_id in st["banned"]
        spare = b2 if route[1] == ids["b1"] else b1
        assert spare.status()["serving_head"] is None
        for prompt, expected in zip(PROMPTS[:2], plain_vllm_outputs[:2]):
            assert _greedy(a, prompt) == prompt + expected
            assert _greedy(spare, prompt) == prompt + expected  # the spare answers HTTP too (forwards)
        in_use = b1 if route[1] == ids["b1"] else b2
        spare_id = spare.status()["peer_id"]
        # a stage dies mid-request: the head's engine fails over to the spare by itself (no
        # restart, nothing resumed); the requests carry on
        how = _requests_survive(a, c, PROMPTS[2], lambda: os.kill(in_use.proc.pid, signal.SIGKILL))
        assert how == "failover"
        assert a.status()["route"][1] == spare_id
        # a stage hangs mid-request (its daemon stopped: it closes nothing, answers nothing) and no
        # other peer serves its span: the engine's failover finds no route, the head sees the stage
        # vanish from the swarm, stops its engine, and routes through it again once it is back (20 s
        # later) and its ban (30 s) has run out; the requests are resumed and carry on
        wake = threading.Timer(20, os.kill, (spare.proc.pid, signal.SIGCONT))
        how = _requests_survive(a, c, PROMPTS[3], lambda: (os.kill(spare.proc.pid, signal.SIGSTOP), wake.start()))
        wake.join()
        st = a.status()
        assert how == "resumed" and st["route"][1] == spare_id and st["resumed_requests"] >= 1
        assert spare_id in st["banned"]
    finally:
        for d in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.proc.pid, signal.SIGCONT)
        if evil is not None:
            evil.kill()
            evil.wait(timeout=10)
        for d in reversed(daemons):
            d.stop()


def _requests_survive(head: Daemon, asker: Daemon, prompt: str, act) -> str:
    """Run two requests, one streaming on the head and one asked on ``asker`` (forwarded to the
    head), call ``act()`` (break a stage) once the stream is under way, and check that both finish
    with no error and exactly the requested number of tokens (none lost or repeated). Returns
    "failover" if the head's engine replaced the stage by itself (nothing resumed), "resumed" if
    the head and the asker each resumed a request on a restarted engine."""
    n_tok = 96
    resumed = {d.name: d.status()["resumed_requests"] for d in (head, asker)}
    failovers = len(head.status()["pipeline"].get("failovers") or [])
    reference = _greedy(head, prompt, n_tok)[len(prompt):]  # an undisturbed run
    before_kill: list[str] = []
    chunks: list[dict] = []
    results: dict = {}
    streaming = threading.Event()

    def stream_on_head() -> None:
        body = {"model": "default", "prompt": prompt, "max_tokens": n_tok, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", head.url + "/v1/completions", json=body, timeout=600) as r:
            results["head_status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
                    if sum(bool(c.get("choices")) for c in chunks) >= 8:
                        streaming.set()

    def ask_last_stage() -> None:
        body = {"model": "default", "prompt": prompt, "max_tokens": n_tok, "temperature": 0, "ignore_eos": True}
        r = httpx.post(asker.url + "/v1/completions", json=body, timeout=600)
        results["asker"] = (r.status_code, r.json())

    threads = [threading.Thread(target=f) for f in (stream_on_head, ask_last_stage)]
    for t in threads:
        t.start()
    assert streaming.wait(120), f"the streaming request never got going: {chunks}"
    before_kill.append("".join(c["choices"][0]["text"] for c in chunks if c.get("choices")))
    act()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)

    assert results["head_status"] == 200
    assert not [c for c in chunks if "error" in c], [c for c in chunks if "error" in c]
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == n_tok, usage
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "length"
    # what the client saw before the kill is the undisturbed run's start, and the answer goes on from it
    assert reference.startswith(before_kill[0]) and text.startswith(before_kill[0]) and len(text) > len(before_kill[0])
    status, answer = results["asker"]
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == n_tok and answer["choices"][0]["finish_reason"] == "length"
    if head.status()["resumed_requests"] == resumed[head.name]:
        assert asker.status()["resumed_requests"] == resumed[asker.name]
        assert len(head.status()["pipeline"].get("failovers") or []) > failovers
        return "failover"
    assert asker.status()["resumed_requests"] > resumed[asker.name]
    return "resumed"
