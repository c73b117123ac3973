"""Distributed inference through real daemons: layer spans on different peers, hidden states over
libp2p, routes from live announcements, HTTP on any peer.

One float32 swarm serves the whole module (float32 greedy output is batch-invariant on vLLM CPU,
so every answer, concurrent or resumed, must equal its single-request reference exactly):
head A [0,10), B1 and B2 [10,20) (one is a spare), C [20,30), and an evil peer announcing
[10,20) that answers garbage. Destructive tests (a stage killed, a stage hung) run last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from tests.helpers import REPO, Daemon, boot_addr, wait_for
from tests.integration.conftest import F32_PROMPTS, MAX_TOKENS

pytestmark = pytest.mark.slow

# float32 everywhere; a short ban so a hung stage is routed through again soon after it is back
OPTS = ["--dtype", "float32", "--ban-seconds", "8"]


def _greedy(d: Daemon, prompt: str, max_tokens: int = MAX_TOKENS, **kw) -> str:
    r = httpx.post(d.url + "/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["text"][0]


@dataclasses.dataclass
class Swarm:
    a: Daemon
    b1: Daemon
    b2: Daemon
    c: Daemon
    evil_id: str
    boot: str
    tmp: object

    def ids(self) -> dict[str, str]:
        return {x.name: x.status()["peer_id"] for x in (self.a, self.b1, self.b2, self.c)}

    def in_use_and_spare(self) -> tuple[Daemon, Daemon]:
        used = self.a.status()["route"][1]
        return (self.b1, self.b2) if self.b1.status()["peer_id"] == used else (self.b2, self.b1)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_dir, f32_reference_job):
    tmp = tmp_path_factory.mktemp("swarm")
    daemons: list[Daemon] = []
    evil = None
    try:
        c = Daemon(["--layers", "20:30", *OPTS], tmp, name="c")
        daemons.append(c)
        boot = boot_addr(c)
        b1 = Daemon(["--layers", "10:20", "--bootstrap", boot, *OPTS], tmp, name="b1")
        b2 = Daemon(["--layers", "10:20", "--bootstrap", boot, *OPTS], tmp, name="b2")
        daemons += [b1, b2]
        model_hash = wait_for(lambda: c.status()["model"]["hash"], 30, "c's model hash")
        evil = subprocess.Popen([sys.executable, str(REPO / "tests/integration/evil_peer.py"), boot, model_hash,
                                 "10", "20", "1800"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = evil.stdout.readline()
        assert line.startswith("READY"), line
        evil_id = line.split()[1]
        wait_for(lambda: evil_id in {p["peer_id"] for p in c.status()["peers"]}, 30, "the evil peer to be seen")
        # the head starts while the stages load (its own engine loads once a route is ready)
        a = Daemon(["--layers", "0:10", "--bootstrap", boot, *OPTS], tmp, name="a")
        daemons.append(a)
        for d in (c, b1, b2, a):
            d.wait_ready(timeout=600)
        yield Swarm(a, b1, b2, c, evil_id, boot, tmp)
    finally:
        for d in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.proc.pid, signal.SIGCONT)
        if evil is not None:
            evil.kill()
            evil.wait(timeout=10)
        for d in reversed(daemons):
            d.stop()


def test_greedy_equals_single_node_on_every_peer(swarm, f32_reference):
    """The head, a stage in use, and the spare (forwarding to the head) all answer exactly like
    single-node vLLM in float32; streamed and OpenAI-style too."""
    in_use, spare = swarm.in_use_and_spare()
    for i, (prompt, expected) in enumerate(zip(F32_PROMPTS, f32_reference["one"])):
        asked = (swarm.a, swarm.c, spare, in_use)[i % 4]
        assert _greedy(asked, prompt) == prompt + expected, asked.name
    prompt, expected = F32_PROMPTS[0], f32_reference["one"][0]
    for d in (swarm.a, swarm.c):
        r = httpx.post(d.url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                        "temperature": 0, "stream": True}, timeout=300)
        lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == expected
        r = httpx.post(d.url + "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                        "temperature": 0}, timeout=300)
        assert r.json()["choices"][0]["text"] == expected


def test_concurrent_requests_each_equal_their_reference(swarm, f32_reference):
    """Requests batched together through three stages (asked on the head and on a stage): every
    answer equals its own single-request reference (a bridge that mixed up the rows of different
    requests would fail), and seeded sampled requests run their full length."""
    jobs = [(d, p, e) for d in (swarm.a, swarm.c) for p, e in zip(F32_PROMPTS, f32_reference["one"])]
    results: list = [None] * len(jobs)
    sampled: list = [None] * 4

    def greedy(i: int) -> None:
        d, p, _ = jobs[i]
        r = httpx.post(d.url + "/v1/completions", json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0},
                       timeout=600)
        results[i] = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    def sample(i: int) -> None:
        d = swarm.a if i % 2 == 0 else swarm.c
        r = httpx.post(d.url + "/v1/completions", json={"prompt": f"Story number {i}:", "max_tokens": 20,
                                                        "ignore_eos": True, "temperature": 0.7, "seed": i},
                       timeout=600)
        sampled[i] = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.text

    threads = [threading.Thread(target=greedy, args=(i,)) for i in range(len(jobs))]
    threads += [threading.Thread(target=sample, args=(i,)) for i in range(len(sampled))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert results == [e for _, _, e in jobs]
    assert sampled == [20] * len(sampled)


def test_route_avoids_the_garbage_peer_and_status_shows_it(swarm):
    """The head tried the evil peer (it claims to be fastest), banned it, and routes through one
    real [10,20) peer; the other is a spare. (After the tests above: the stages have step times.)"""
    a, c = swarm.a, swarm.c
    st = a.status()
    ids = swarm.ids()
    route = st["route"]
    assert len(route) == 3 and route[0] == st["peer_id"] and route[2] == ids["c"]
    assert route[1] in (ids["b1"], ids["b2"]) and swarm.evil_id not in route
    assert swarm.evil_id in st["banned"]
    in_use, spare = swarm.in_use_and_spare()
    assert spare.status()["serving_head"] is None
    assert in_use.status()["serving_head"] == c.status()["serving_head"] == st["peer_id"]
    assert st["role"] == "head" and in_use.status()["role"] == "stage"
    assert [(h["start"], h["end"]) for h in st["stages"]] == [(0, 10), (10, 20), (20, 30)]
    assert all(isinstance(h["step_ms"], float) and h["step_ms"] > 0 for h in st["stages"]), st["stages"]
    assert st["pipeline"]["steps"] > 0 and st["pipeline"]["round_trip_ms"] > 0
    assert st["coverage"]["complete"] is True
    r = subprocess.run([sys.executable, "-m", "cli.molink", "status", "--api", a.url], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0 and "route" in r.stdout and "complete" in r.stdout


def test_partial_model_peers_hold_kv_for_their_layers_in_their_dtype(swarm, single_node):
    """Each peer holds only its layers, in the --dtype it was given: the same 1 GiB of KV cache
    holds 30/(10*2) = 1.5 times the blocks of the bf16 full node (a third of the layers, twice the
    bytes per value in float32). (The weights' memory cannot tell: 10 float32 layers plus the
    embeddings weigh about as much as the whole bf16 model.)"""
    for d in (swarm.a, swarm.c):
        assert d.status()["engine"]["loaded_rss_mb"] > 0
    assert swarm.c.status()["engine_rss_mb"] > 0
    ratio = swarm.a.status()["engine"]["kv_blocks"] / single_node.status()["engine"]["kv_blocks"]
    assert ratio == pytest.approx(1.5, rel=0.05), ratio


def test_metrics_and_event_lines_on_the_swarm(swarm):
    """The head's /metrics shows its route (per-stage step time) and coverage after requests; the
    last stage logged one line for the head joining, the head one for the route it chose."""
    from tests.integration.test_operations import scrape, value

    a, c = swarm.a, swarm.c
    _greedy(a, F32_PROMPTS[1], max_tokens=8)
    _greedy(c, F32_PROMPTS[2], max_tokens=8)  # forwarded to the head
    hs, cs = a.status(), c.status()
    h, s = scrape(a), scrape(c)
    assert value(h, "molink_route_stages") == 3 and value(h, "molink_layers_covered") == 30
    assert value(h, "molink_largest_gap_layers") == 0 and value(h, "molink_ready") == 1
    spans = ["0:10", "10:20", "20:30"]
    for i, (peer, layers) in enumerate(zip(hs["route"], spans)):
        assert value(h, "molink_stage_step_seconds", stage=str(i), peer=peer, layers=layers) > 0
    assert value(h, "molink_pipeline_steps_total") > 0 and value(h, "molink_route_changes_total") >= 1
    assert value(h, "molink_peer_sent_bytes_total", peer=hs["route"][1]) > 0  # hidden states, gossip
    assert value(h, "molink_requests_total", endpoint="/generate", outcome="ok") >= 1
    assert value(s, "molink_requests_total", endpoint="/generate", outcome="ok") >= 1
    assert value(s, "molink_ready") == 1 and value(s, "molink_route_stages") == 0
    routes = [x for x in a.log_path.read_text().splitlines() if "molinkd.events: route " in x]
    assert routes and "route chosen" in routes[0], routes
    joined = [x for x in c.log_path.read_text().splitlines() if "molinkd.events: peer joined" in x]
    assert [x for x in joined if f"peer={hs['peer_id']}" in x and f"me={cs['peer_id']}" in x], joined


@pytest.mark.timeout(1200)
def test_two_heads_share_the_swarm(swarm, f32_reference):
    """A second head and a second [20,30) stage join: the second head routes through the spare and
    its own [20,30) (one head per stage); both heads answer exactly. The second head and its stage
    have twice the KV cache space, the spare does not: the route agrees on the minimum. A gateway
    sends a request to the less loaded head, and a client leaving mid-stream frees the head's slot.
    Killed outright, the second head and stage take their engine processes with them."""
    _, spare = swarm.in_use_and_spare()
    tmp = swarm.tmp
    c2 = Daemon(["--layers", "20:30", "--bootstrap", swarm.boot, "--kv-cache-gib", "2", *OPTS], tmp, name="c2")
    head2 = Daemon(["--layers", "0:10", "--bootstrap", swarm.boot, "--kv-cache-gib", "2", *OPTS], tmp,
                   name="head2")
    gw = Daemon(["--layers", "none", "--bootstrap", swarm.boot], tmp, name="gw")
    try:
        c2.wait_ready(timeout=600)
        head2.wait_ready(timeout=600)
        ids = swarm.ids()
        assert swarm.a.status()["route"][2] == ids["c"]
        assert head2.status()["route"][1:] == [spare.status()["peer_id"], c2.status()["peer_id"]]
        # KV blocks: the minimum over the route (the spare's 1 GiB), not the head's own 2 GiB
        kv1, kv2 = swarm.a.status()["engine"]["kv_blocks"], head2.status()["engine"]["kv_blocks"]
        assert kv1 and kv2 == kv1, (kv1, kv2)
        results: dict = {}

        def run(d: Daemon, key: str) -> None:
            results[key] = [_greedy(d, p) for p in F32_PROMPTS[:3]]

        threads = [threading.Thread(target=run, args=(d, k)) for d, k in ((swarm.a, "h1"), (head2, "h2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        expected = [p + e for p, e in zip(F32_PROMPTS[:3], f32_reference["one"][:3])]
        assert results["h1"] == expected and results["h2"] == expected
        _gateway_picks_the_less_loaded_head_and_frees_slots(gw, swarm.a, head2)
        # a daemon killed outright takes its engine processes with it (no orphaned model in memory):
        # the stage process of a stage, vLLM's EngineCore of a head
        import psutil

        from molinkd import runtime

        for d in (c2, head2):
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
        # the spare is free again once its head is gone
        wait_for(lambda: spare.status()["serving_head"] is None, 120, "the spare to be released")
    finally:
        gw.stop()
        head2.stop()
        c2.stop()


def _heads_seen(gw: Daemon) -> dict[str, dict]:
    return {p["peer_id"]: p for p in gw.status()["peers"]
            if p["layers"][0] == 0 and p["layers"][1] > 0 and (p.get("extras") or {}).get("engine") == "ready"}


def _gateway_picks_the_less_loaded_head_and_frees_slots(gw: Daemon, h1: Daemon, h2: Daemon) -> None:
    id1, id2 = h1.status()["peer_id"], h2.status()["peer_id"]
    wait_for(lambda: {id1, id2} <= set(_heads_seen(gw)) and gw.status()["ready"], 60, "the gateway to see both heads")
    body = {"prompt": "Tell me a story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    # keep head 1 busy; once the gateway has heard so (announcements), it must choose head 2
    with httpx.stream("POST", h1.url + "/v1/completions", json=body, timeout=300) as busy:
        lines = busy.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        wait_for(lambda: _heads_seen(gw)[id1]["active_requests"] >= 1
                 and _heads_seen(gw)[id2]["active_requests"] == 0, 60, "the gateway to see head 1 busy")
        totals = {id1: h1.status()["total_requests"], id2: h2.status()["total_requests"]}
        r = httpx.post(gw.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=300)
        assert r.status_code == 200, r.text
        assert h2.status()["total_requests"] == totals[id2] + 1
        assert h1.status()["total_requests"] == totals[id1]
    # a client leaving a stream through the gateway: the head serving it drops the request
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=300) as r:
        seen = []
        lines = r.iter_lines()  # (keep a reference: a dropped line iterator closes the connection)
        for line in lines:
            if line.startswith("data: "):
                seen.append(line)
            if len(seen) >= 3:
                break
        assert r.status_code == 200 and len(seen) == 3 and "error" not in "".join(seen), (r.status_code, seen)
        wait_for(lambda: sum(h.status()["active_requests"] for h in (h1, h2)) == 1, 30, "the request on a head")
        assert gw.status()["active_requests"] == 1
    for d in (gw, h1, h2):
        wait_for(lambda d=d: (st := d.status())["active_requests"] == 0 and st["engine"]["unfinished"] == 0, 60,
                 f"{d.name} to drop the request of the client that left")


def _stage_process(d: Daemon):
    import psutil

    kids = []
    for p in psutil.Process(d.proc.pid).children():
        try:  # a killed child may linger as a zombie until the daemon reaps it
            if p.status() != psutil.STATUS_ZOMBIE and "molinkd.engine.stage" in " ".join(p.cmdline()):
                kids.append(p)
        except psutil.Error:
            pass
    return kids[0] if len(kids) == 1 else None


@pytest.mark.timeout(900)
def test_a_crashed_stage_process_is_restarted_with_backoff(swarm):
    """The spare's stage process dies (SIGKILL), then its replacement dies while loading: the daemon
    restarts it after 2 s, then 4 s (doubling), and the stage serves again."""
    _, spare = swarm.in_use_and_spare()
    wait_for(lambda: spare.status()["serving_head"] is None and spare.status()["ready"], 120, "a free, ready spare")
    first = wait_for(lambda: _stage_process(spare), 30, "the spare's stage process")
    log_at = len(spare.log_path.read_text(errors="replace"))
    first.kill()
    second = wait_for(lambda: (p := _stage_process(spare)) and p.pid != first.pid and p, 60, "a restarted stage process")
    assert not spare.status()["ready"]
    second.kill()
    wait_for(lambda: (p := _stage_process(spare)) and p.pid not in (first.pid, second.pid), 60, "a second restart")
    wait_for(lambda: spare.status()["ready"], 300, "the restarted stage to be ready")
    said = spare.log_path.read_text(errors="replace")[log_at:]
    assert "stage process exited with -9" in said, said
    assert said.index("restarting in 2s") < said.index("restarting in 4s"), said


@pytest.mark.timeout(1200)
def test_a_killed_then_a_hung_stage_mid_request(swarm):
    """A stage dies mid-request: the head re-plans through the spare and the requests carry on.
    Then that stage hangs mid-request (its daemon stopped: it closes nothing, answers nothing): the
    head sees it vanish from the swarm, bans it and stops its engine; once it is back and its ban
    has run out, the head routes through it again and the requests carry on."""
    a, c = swarm.a, swarm.c
    in_use, spare = swarm.in_use_and_spare()
    spare_id = spare.status()["peer_id"]
    # the head's engine fails over to the spare by itself (no restart, nothing resumed)
    assert _requests_survive(a, c, F32_PROMPTS[2], lambda: os.kill(in_use.proc.pid, signal.SIGKILL)) == "failover"
    assert a.status()["route"][1] == spare_id

    def hang_until_banned() -> None:
        os.kill(spare.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: spare_id in a.status()["banned"] and a.status()["banned"][spare_id]["active"], 180,
                     "the head to ban the hung stage")
        finally:
            os.kill(spare.proc.pid, signal.SIGCONT)

    # no other peer serves the hung span now: the engine waits for a new tail; once the stage is
    # back the requests carry on, in the same engine or a restarted one (then resumed)
    # (if it is back within --failover-wait the running engine takes it again: "failover")
    how = _requests_survive(a, c, F32_PROMPTS[3], hang_until_banned)
    st = a.status()
    assert how in ("failover", "resumed") and st["route"][1] == spare_id and spare_id in st["banned"]


def _requests_survive(head: Daemon, asker: Daemon, prompt: str, act) -> str:
    """Run two requests, one streaming on the head and one asked on ``asker`` (forwarded to the
    head), call ``act()`` (break a stage) once the stream is under way, and check that both finish
    with no error and exactly the tokens of an undisturbed run (float32: none lost, repeated or
    changed). Returns "failover" if the head's engine replaced the stage by itself (nothing
    resumed), "resumed" if the head and the asker each resumed a request on a restarted engine."""
    n_tok = 96
    resumed = {d.name: d.status()["resumed_requests"] for d in (head, asker)}
    failovers = len(head.status()["pipeline"].get("failovers") or [])
    reference = _greedy(head, prompt, n_tok, ignore_eos=True)[len(prompt):]  # an undisturbed run
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
    before = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
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
    # the client saw the start before the break, and the whole answer is the undisturbed one
    assert reference.startswith(before) and len(before) < len(reference)
    assert text == reference
    status, answer = results["asker"]
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == n_tok and answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["text"] == reference
    if head.status()["resumed_requests"] == resumed[head.name]:
        assert asker.status()["resumed_requests"] == resumed[asker.name]
        assert len(head.status()["pipeline"].get("failovers") or []) > failovers
        return "failover"
    assert asker.status()["resumed_requests"] > resumed[asker.name]
    return "resumed"
