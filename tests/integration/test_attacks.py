"""A hostile peer against a real stage, while an honest head keeps serving through another stage.

The swarm: an honest head (0:15, auditing every request it can) routing through stage A (15:30,
which lies about its speed, and returns wrong values once a test switches that lie on), an honest
verifier W (15:30, announcing a modest speed so that routes start through A), and a victim stage
V (10:20) that no honest route uses. The attacker is two libp2p identities in this test process (they cost nothing
to make): ``evil`` opens sessions on V, ``accomplice`` announces layers 20:30 and plays V's next hop,
so V can be driven through whole sessions and we can see what it forwards. Every attack must be
refused or contained; V must stay healthy; the head's requests must all succeed meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import uuid

import httpx
import msgpack
import pytest
import torch
import trio

from molinkd.engine import schedwire, wire
from molinkd.engine.link import STAGE_PROTOCOL
from p2p.discovery import Discovery
from p2p.framing import HEADER
from p2p.host import NodeConfig, open_node
from p2p.tensors import to_wire
from tests.helpers import Daemon, boot_addr, wait_for
from tests.integration.conftest import MAX_TOKENS, PROMPTS

pytestmark = [pytest.mark.slow, pytest.mark.engines("bf16")]

BLOCK_SIZE = 128  # vLLM CPU default
HIDDEN = 576
VOCAB = 49152
KV = ["--kv-cache-gib", "0.25"]  # a quarter GiB of KV cache per engine: the suite runs many at once


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    lie = tmp / "stageA-lies"  # while this file exists, stage A returns wrong values
    # stage A computes honestly but announces 1e6 tokens/s: the head must measure it and ban it
    a = Daemon(["--layers", "15:30", *KV], tmp, name="stageA", module="tests.integration.lying_daemon",
               env={"MOLINK_TEST_LIE_FILE": str(lie)})
    daemons = [a]
    try:
        boot = boot_addr(a)
        v = Daemon(["--layers", "10:20", "--bootstrap", boot, "--max-num-seqs", "8", *KV], tmp, name="victim")
        # the head loads its own layers while stage A loads, then routes through A
        h = Daemon(["--layers", "0:15", "--bootstrap", boot, "--audit-rate", "1", "--audit-quorum", "1", *KV], tmp,
                   name="head")
        daemons += [v, h]
        # an honest verifier for A's layers (it announces 1 token/s), loading alongside but held
        # back from the swarm until the head routes through A (a verifier ready first could win it)
        hold = tmp / "verifier-released"
        w = Daemon(["--layers", "15:30", "--bootstrap", boot, *KV], tmp, name="verifier", module="tests.integration.lying_daemon",
                   env={"MOLINK_TEST_ANNOUNCE": "1", "MOLINK_TEST_HOLD_FILE": str(hold)})
        daemons.append(w)
        for d in daemons:
            d.wait_ready(timeout=400)
        aid, wid = a.status()["peer_id"], w.status()["peer_id"]
        wait_for(lambda: h.status()["route"], 120, "the head's route")
        assert h.status()["route"][1] == aid, "the head should start routing through stage A"
        hold.touch()
        wait_for(lambda: any(p["peer_id"] == wid and (p.get("extras") or {}).get("engine") == "ready"
                             for p in h.status()["peers"]), 60, "the head to see the verifier ready")
        yield {"head": h, "stage": a, "victim": v, "verifier": w, "boot": boot, "hash": h.status()["model"]["hash"],
               "vid": v.status()["peer_id"], "vaddr": boot_addr(v), "hid": h.status()["peer_id"], "aid": aid,
               "wid": wid, "lie": lie}
    finally:
        for d in reversed(daemons):
            d.stop()


@pytest.fixture(scope="module")
def honest_load(swarm):
    """Greedy requests to the honest head for as long as the module's attacks run, one a second
    (each is audited on the verifier: back to back they kept a core busy for the whole module)."""
    stop = threading.Event()
    results: list = []

    def run() -> None:
        i = 0
        while not stop.is_set() and i < 500:
            i += 1
            try:
                r = httpx.post(swarm["head"].url + "/v1/completions", timeout=120,
                               json={"prompt": f"Count to {i}:", "max_tokens": 8, "ignore_eos": True})
                results.append(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8)
            except Exception as e:  # noqa: BLE001
                results.append(f"{type(e).__name__}: {e}")
            stop.wait(1.0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield results
    stop.set()
    t.join(timeout=130)


# ------------------------------------------------------------------------------ the attacker


class Accomplice:
    """Announces 20:30 and plays the victim's next hop: answers the handshake, records steps."""

    def __init__(self) -> None:
        self.steps_send, self.steps = trio.open_memory_channel(64)
        self.sessions = 0

    async def handler(self, stream, remote) -> None:
        self.sessions += 1
        with contextlib.suppress(Exception):
            while True:
                f = await stream.recv(timeout=60)
                if f.type == "p2p.from" or f.type == wire.CLOSE:
                    return
                if f.type == wire.HELLO:
                    stages = f.body["stages"] + [{"index": 2, "start": 20, "end": 30, "max_blocks": 10_000,
                                                   "peer": "accomplice"}]
                    await stream.send(wire.HELLO_OK, {"session": f.body["session"], "stages": stages})
                elif f.type == wire.OPEN:
                    await stream.send(wire.OPEN_OK, {"session": f.body["session"], "num_blocks": f.body["num_blocks"]})
                elif f.type == wire.STEP:
                    await self.steps_send.send(f.body)
                elif f.type == wire.PING:
                    await stream.send(wire.PONG, f.body)


def _leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


@contextlib.asynccontextmanager
async def attackers(swarm):
    """The attacker's two nodes; failures inside surface as themselves, not as nested groups."""
    try:
        async with _attackers(swarm) as nodes:
            yield nodes
    except BaseExceptionGroup as g:
        raise _leaf(g) from None


@contextlib.asynccontextmanager
async def _attackers(swarm):
    cfg = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=(swarm["boot"],))
    acc = Accomplice()
    async with open_node(cfg) as evil, open_node(cfg) as helper, trio.open_nursery() as nursery:
        helper.set_stream_handler(STAGE_PROTOCOL, acc.handler)

        def record() -> dict:
            return {"model_name": "x", "span_start": 20, "span_end": 30, "total_layers": 30, "throughput": 1.0,
                    "extras": {"role": "stage", "engine": "ready"}}

        disc = Discovery(helper, swarm["hash"], record, period=0.5)
        await nursery.start(disc.run)
        await helper.connect(swarm["vid"], [swarm["vaddr"]], timeout=20)

        def victim_sees_accomplice() -> bool:
            peers = swarm["victim"].status()["peers"]
            return any(p.get("peer_id") == helper.peer_id for p in peers)

        await trio.to_thread.run_sync(lambda: wait_for(victim_sees_accomplice, 60, "the accomplice's record"))
        yield evil, helper, acc
        nursery.cancel_scope.cancel()


def route(evil: str, victim: str, nxt: str, nxt_addr: str | None = None) -> list[dict]:
    return [{"peer": evil, "addr": "", "start": 0, "end": 10},
            {"peer": victim, "addr": f"p2p:{victim}", "start": 10, "end": 20},
            {"peer": nxt, "addr": f"p2p:{nxt}" if nxt_addr is None else nxt_addr, "start": 20, "end": 30}]


def session(swarm, r: list[dict], *, num_blocks: int = 0) -> dict:
    return wire.session_body(session=uuid.uuid4().hex, model_hash=swarm["hash"], route=r, num_layers=30,
                             dtype="bfloat16", max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=2048,
                             block_size=BLOCK_SIZE, num_blocks=num_blocks)


async def victim_stream(evil, swarm):
    return await evil.open_stream(swarm["vid"], STAGE_PROTOCOL, [swarm["vaddr"]], timeout=20)


async def expect_error(stream, match: str, timeout: float = 60) -> str:
    f = await stream.recv(timeout=timeout)
    assert f.type == wire.ERROR, (f.type, f.body)
    assert match in f.body["message"], f.body["message"]
    return f.body["message"]


async def open_session(stream, swarm, r, num_blocks: int | None = None) -> int:
    """hello + open through the victim; returns the block count agreed."""
    await stream.send(wire.HELLO, session(swarm, r))
    ok = await stream.recv(timeout=60)
    assert ok.type == wire.HELLO_OK, ok.body
    mine = ok.body["stages"][0]
    assert mine["peer"] == swarm["vid"] and mine["max_blocks"] > 100
    n = mine["max_blocks"] if num_blocks is None else num_blocks
    body = session(swarm, r, num_blocks=n)
    body["session"] = ok.body["session"]
    await stream.send(wire.OPEN, body)
    ok = await stream.recv(timeout=60)
    assert ok.type == wire.OPEN_OK, ok.body
    return mine["max_blocks"]


def prefill(req: str = "r1", tokens: list[int] | None = None, blocks: list[int] | None = None,
            computed: int = 0, n_sched: int | None = None, rows: int | None = None, width: int = HIDDEN,
            dtype=torch.bfloat16) -> dict:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    tokens = tokens if tokens is not None else [1, 2, 3, 4, 5]
    n = len(tokens) - computed if n_sched is None else n_sched
    sp = SamplingParams(max_tokens=4, temperature=0.0)
    sp.update_from_generation_config({}, eos_token_id=2)
    so = SchedulerOutput(
        scheduled_new_reqs=[NewRequestData(req_id=req, prompt_token_ids=tokens, mm_features=[], sampling_params=sp,
                                           pooling_params=None, block_ids=(blocks if blocks is not None else [0],),
                                           num_computed_tokens=computed, lora_request=None)],
        scheduled_cached_reqs=CachedRequestData.make_empty(), num_scheduled_tokens={req: n},
        total_num_scheduled_tokens=n, scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
        finished_req_ids=set(), free_encoder_mm_hashes=[])
    r = n if rows is None else rows
    hidden = {k: to_wire(torch.randn(r, width).to(dtype)) for k in ("hidden_states", "residual")}
    return {"step": 1, "sched": schedwire.encode_scheduler_output(so), "grammar": None, "hidden": hidden,
            "sample": True}


# ------------------------------------------------------------------------------------ attacks


def test_a_bf16_route_answers_like_plain_vllm_one_request_at_a_time(swarm, plain_vllm_outputs):
    """Before any load or attack: the head [0,15) + stage A [15,30), in bf16, answers every prompt
    exactly like plain single-node vLLM on this machine, one request at a time (bf16 greedy output
    depends on batch composition, so one at a time is where equality holds)."""
    for prompt, expected in zip(PROMPTS, plain_vllm_outputs):
        r = httpx.post(swarm["head"].url + "/generate", timeout=300,
                       json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["text"][0] == prompt + expected
    assert swarm["head"].status()["route"][1] == swarm["aid"]


async def test_a_peer_that_is_not_the_previous_hop_cannot_open_a_session(swarm, honest_load):
    async with attackers(swarm) as (evil, helper, acc):
        s = await victim_stream(evil, swarm)
        # a session in the honest head's name: the route says the head feeds the victim
        await s.send(wire.HELLO, session(swarm, route(swarm["hid"], swarm["vid"], helper.peer_id)))
        await expect_error(s, "previous hop")
        await s.close()
        # a first frame that is no session at all
        s = await victim_stream(evil, swarm)
        await s.send(wire.STEP, prefill())
        await expect_error(s, "starts with")
    st = swarm["victim"].status()
    assert st["serving_head"] is None and acc.sessions == 0


async def test_a_stage_never_dials_an_address_the_network_chose(swarm, honest_load):
    hits = []
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    async def count_connections() -> None:
        while True:
            conn, _ = await listener.accept()
            hits.append(conn)

    async with attackers(swarm) as (evil, helper, acc), trio.open_nursery() as nursery:
        nursery.start_soon(count_connections)
        for addr in (f"tcp:127.0.0.1:{port}", "unix:/tmp/x.sock"):
            s = await victim_stream(evil, swarm)
            await s.send(wire.HELLO, session(swarm, route(evil.peer_id, swarm["vid"], helper.peer_id, addr)))
            await expect_error(s, "p2p:<peer id>")
            await s.close()
        # a peer id that is not announcing 20:30 (stage A serves 15:30): the victim's daemon will not dial it
        s = await victim_stream(evil, swarm)
        await s.send(wire.HELLO, session(swarm, route(evil.peer_id, swarm["vid"], swarm["aid"])))
        await expect_error(s, "will not dial")
        await s.close()
        await trio.sleep(2)  # bounded: any dial the victim made would have landed by now
        nursery.cancel_scope.cancel()
    listener.close()
    assert hits == [] and acc.sessions == 0
    assert swarm["victim"].status()["serving_head"] is None


@pytest.mark.parametrize("attack,match", [
    (dict(blocks=[10 ** 6]), "block"),
    (dict(blocks=[-1]), "block"),
    (dict(tokens=[1, 2, VOCAB + 5]), "token"),
    (dict(tokens=list(range(1, 3000))), "token"),
    (dict(computed=2040, tokens=[1] * 2050, n_sched=10), "max_model_len"),
    (dict(rows=4), "shape"),
    (dict(width=HIDDEN * 2), "shape"),
    (dict(dtype=torch.float32), "dtype"),
])
async def test_out_of_range_steps_are_refused_before_vllm(swarm, honest_load, attack, match):
    async with attackers(swarm) as (evil, helper, acc):
        s = await victim_stream(evil, swarm)
        await open_session(s, swarm, route(evil.peer_id, swarm["vid"], helper.peer_id), num_blocks=64)
        await s.send(wire.STEP, prefill(**attack))
        msg = await expect_error(s, "")
        assert match in msg.lower() or match in msg, msg
        with trio.move_on_after(1):
            got = await acc.steps.receive()
            pytest.fail(f"the victim forwarded a step it should have refused: {list(got)}")


async def test_a_one_block_session_does_not_shrink_the_cache_and_the_stage_still_computes(swarm, honest_load):
    async with attackers(swarm) as (evil, helper, acc):
        s = await victim_stream(evil, swarm)
        full = await open_session(s, swarm, route(evil.peer_id, swarm["vid"], helper.peer_id), num_blocks=1)
        await s.send(wire.STEP, prefill(blocks=[1]))  # block 1 is outside a 1-block session
        await expect_error(s, "block")
        s = await victim_stream(evil, swarm)
        again = await open_session(s, swarm, route(evil.peer_id, swarm["vid"], helper.peer_id))
        assert again == full
        # an honest step: the victim computes layers 10:20 and forwards (5 tokens x 576) hidden states
        await s.send(wire.STEP, prefill(blocks=[full - 1]))
        with trio.fail_after(60):
            step = await acc.steps.receive()
        assert step["hidden"]["hidden_states"]["shape"] == [5, HIDDEN]
        await s.send(wire.CLOSE, {"session": "x"})


async def test_malformed_frames_are_dropped(swarm, honest_load):
    async with attackers(swarm) as (evil, helper, acc):
        # a msgpack timestamp (ext -1), which msgpack decodes without asking the ext hook
        payload = msgpack.packb({"v": 1, "t": wire.HELLO, "b": {"when": msgpack.Timestamp(1, 0)}})
        s = await victim_stream(evil, swarm)
        await s.send_raw(HEADER.pack(len(payload)) + payload)
        with pytest.raises(Exception):
            f = await s.recv(timeout=10)
            assert f.type != wire.HELLO_OK
            raise RuntimeError(f.type)
        # deep nesting: 100k nested one-element arrays in ~100 KB
        payload = msgpack.packb({"v": 1, "t": wire.HELLO, "b": None})[:-1] + b"\x91" * 100_000 + b"\xc0"
        s = await victim_stream(evil, swarm)
        await s.send_raw(HEADER.pack(len(payload)) + payload)
        with pytest.raises(Exception):
            f = await s.recv(timeout=10)
            raise RuntimeError(f.type)
    assert swarm["victim"].status()["engine"]["state"] == "ready"


async def test_live_stage_survives_mutated_steps_and_frames(swarm, honest_load):
    """Fuzz a live stage (kept small for the suite's time; the decoders get ~60k inputs in
    tests/unit/test_fuzz.py): mutated step bodies inside admitted sessions (each is refused with an
    eng.error, or is valid and computed), and damaged session frames as a stream's first frame.
    The stage process never dies and still computes an honest step afterwards."""
    from p2p.framing import encode_frame
    from tests.fuzzing import mutate_frames, mutate_step_bodies

    async with attackers(swarm) as (evil, helper, acc):
        r = route(evil.peer_id, swarm["vid"], helper.peer_id)
        refused = computed = 0
        for body in mutate_step_bodies(prefill(blocks=[3]), 12, seed=8):
            s = await victim_stream(evil, swarm)
            await open_session(s, swarm, r, num_blocks=64)
            try:
                await s.send(wire.STEP, body)
            except Exception:  # noqa: BLE001 - a body our own encoder refuses never leaves
                await s.close()
                continue
            with trio.move_on_after(30):
                async with trio.open_nursery() as n:
                    async def on_error() -> None:
                        nonlocal refused
                        with contextlib.suppress(Exception):
                            f = await s.recv(timeout=30)
                            refused += f.type == wire.ERROR
                        n.cancel_scope.cancel()

                    async def on_forward() -> None:
                        nonlocal computed
                        await acc.steps.receive()
                        computed += 1
                        n.cancel_scope.cancel()

                    n.start_soon(on_error)
                    n.start_soon(on_forward)
            await s.close()
        assert refused + computed >= 10, (refused, computed)
        hello = encode_frame(wire.HELLO, session(swarm, r))
        # damaged first frames, 8 streams at a time (a truncated frame makes the daemon wait for
        # the rest of it: each stream gets 2 s, then is closed)
        pending = trio.Semaphore(8)

        async def send_damaged(damaged: bytes) -> None:
            async with pending:
                s = await victim_stream(evil, swarm)
                with contextlib.suppress(Exception):
                    await s.send_raw(damaged)
                    with trio.move_on_after(2):
                        await s.recv(timeout=2)
                await s.close()

        async with trio.open_nursery() as n:
            for damaged in mutate_frames(hello, 80, seed=9):
                n.start_soon(send_damaged, damaged)
        # still alive and computing
        s = await victim_stream(evil, swarm)
        await open_session(s, swarm, r)
        await s.send(wire.STEP, prefill(req="after-fuzz", blocks=[5]))
        with trio.fail_after(60):
            while True:
                step = await acc.steps.receive()
                if step["sched"]["scheduled_new_reqs"][0]["req_id"] == "after-fuzz":
                    break
        assert step["hidden"]["hidden_states"]["shape"] == [5, HIDDEN]
    assert swarm["victim"].status()["engine"]["state"] == "ready"
    assert "stage process exited" not in swarm["victim"].log_tail(1000)


def test_honest_requests_were_served_throughout(swarm, honest_load):
    wait_for(lambda: len(honest_load) >= 3, 120, "a few honest requests")
    assert honest_load and all(r is True for r in honest_load), honest_load
    assert swarm["victim"].status()["engine"]["state"] == "ready"


def test_a_stage_that_lies_about_its_speed_is_banned(swarm, honest_load):
    """A computes correctly but announces 1e6 tokens/s; after enough measured steps the head bans it
    from future routes (the running pipeline keeps it: its answers are right)."""
    def banned():
        return swarm["head"].status()["banned"].get(swarm["aid"])
    wait_for(lambda: len(honest_load) >= 4, 180, "steps through the lying stage")
    ban = wait_for(banned, 60, "the head to ban the lying stage")
    assert "lied about its speed" in ban["reason"] and "measured" in ban["reason"], ban


def _audits(swarm) -> dict:
    return swarm["head"].status()["audits"]


def _greedy(swarm, i: int) -> bool:
    r = httpx.post(swarm["head"].url + "/v1/completions", timeout=120,
                   json={"prompt": f"Audit me, number {i}:", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_audits_of_an_honest_stage_agree(swarm, honest_load):
    """Every request the head can audit is recomputed on the verifier W; stage A computes honestly
    here, so every audit agrees and nothing is banned for wrong values."""
    for i in range(3):
        assert _greedy(swarm, i)
    got = wait_for(lambda: (a := _audits(swarm))["agree"] >= 3 and a, 120, "three audits")
    assert got["disagree"] == 0, got
    ban = swarm["head"].status()["banned"].get(swarm["aid"])
    assert ban is None or "wrong values" not in ban["reason"], ban
    assert swarm["head"].status()["route"][1] == swarm["aid"]


def test_a_stage_returning_wrong_values_is_caught_banned_and_routed_around(swarm, honest_load):
    """Stage A starts returning wrong values (it negates the hidden states it gets) at an honest
    speed: the next audit disagrees, the head bans A with the reason, counts the disagreement, fails
    over to W, and requests keep being answered through W (destructive: A is banned from here on)."""
    head = swarm["head"]
    swarm["lie"].touch()
    try:
        i = 100
        def caught():
            nonlocal i
            i += 1
            _greedy(swarm, i)
            ban = head.status()["banned"].get(swarm["aid"])
            return ban if ban and "wrong values" in ban["reason"] else None
        ban = wait_for(caught, 180, "the head to ban the stage returning wrong values", step=0.5)
        assert ban["active"] and "audit" in ban["reason"] and "nats apart" in ban["reason"], ban
        metrics = httpx.get(head.url + "/metrics", timeout=10).text
        assert 'molink_audits_total{outcome="disagree"}' in metrics
        assert _audits(swarm)["disagree"] >= 1
        wait_for(lambda: head.status()["route"] == [swarm["hid"], swarm["wid"]], 120, "a route through the verifier")
        served = len(honest_load)
        for j in range(3):
            assert _greedy(swarm, 200 + j)
        wait_for(lambda: len(honest_load) >= served + 2, 120, "more honest requests")
        assert all(r is True for r in honest_load[served:]), honest_load[served:]
        assert "returned wrong values" in head.log_tail(400)
    finally:
        swarm["lie"].unlink(missing_ok=True)


def test_sigterm_drains_in_flight_requests_then_exits_0(swarm, honest_load):
    """Last in this module (it stops the head): a SIGTERMed head says goodbye, answers new requests
    with 503, finishes the request it was streaming with every token, and exits 0."""
    import json
    import os
    import signal

    head = swarm["head"]
    got: dict = {}

    streaming = threading.Event()

    def stream() -> None:
        body = {"prompt": "Tell a long story.", "max_tokens": 96, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", head.url + "/v1/completions", json=body, timeout=300) as r:
            for x in r.iter_lines():
                if x.startswith("data: "):
                    lines.append(x)
                    streaming.set()
        got["done"] = bool(lines) and lines[-1] == "data: [DONE]"
        got["text"] = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])

    t = threading.Thread(target=stream)
    t.start()
    assert streaming.wait(timeout=120), "the streamed request never started"
    # to the daemon's whole process group, as Ctrl-C in a terminal or `kill -TERM -PGID` would:
    # the engine process is not in it (it would die mid-request), the daemon drains, then stops it
    os.killpg(head.proc.pid, signal.SIGTERM)
    r = wait_for(lambda: httpx.post(head.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                    timeout=10), 20, "an answer while draining")
    assert r.status_code == 503, r.text
    t.join(timeout=300)
    assert head.proc.wait(timeout=60) == 0, head.log_tail()
    assert got["done"] and got["text"], got
    assert "drained" in head.log_tail(200), head.log_tail()
