"""End to end: a vLLM pipeline head [0,15) + a stage process [15,30) give exactly the greedy
outputs of single-node vLLM on the same model (the 3-stage chain runs through daemons in
test_pipeline_swarm.py).

float32, so batches can be compared too (bf16 greedy output depends on batch composition,
design.md section 4); a bf16 route is compared with plain bf16 vLLM one request at a time in
test_attacks.py (its swarm is bf16). The references are computed in the same run on the same
machine (conftest.py).
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.conftest import F32_PROMPTS, MAX_TOKENS
from tests.integration.pipeline_helpers import DRIVER, BackgroundJob, Stage, route_for

pytestmark = [pytest.mark.slow, pytest.mark.engines("local-pipeline")]


def spec(model_dir, dtype, route=None, prompts=F32_PROMPTS, **kw):
    return {"model": model_dir, "dtype": dtype, "route": route, "prompts": prompts, "max_tokens": MAX_TOKENS, **kw}


@pytest.fixture(scope="module")
def stages(model_dir, tmp_path_factory, f32_reference_job):
    """A float32 stage for layers 15:30 (loading while the float32 reference computes)."""
    tmp = tmp_path_factory.mktemp("pipeline_engine")
    stage = Stage(model_dir, "15:30", tmp, dtype="float32")
    try:
        stage.wait_ready()
        yield {"float32": stage}
    finally:
        stage.stop()


def _hello(stage: Stage, **change) -> tuple[str, dict]:
    """Send a session probe straight to a running stage (as a head's executor would) and return its
    answer: (frame type, body)."""
    from molinkd.engine import wire
    from molinkd.engine.link import FramedLink

    body = wire.session_body(session="probe", model_hash="", route=route_for([(0, 15), (15, 30)], [stage]),
                             num_layers=30, dtype="float32", max_model_len=1024, max_num_seqs=32,
                             max_num_batched_tokens=256, block_size=128)  # vLLM CPU's block size
    body.update(change)
    link = FramedLink.connect(stage.addr, timeout=10)
    try:
        link.send(wire.HELLO, body)
        f = link.recv(timeout=60)
        return f.type, f.body
    finally:
        link.close()


@pytest.mark.parametrize("change,needle", [
    ({"route": [{"peer": "head", "addr": "", "start": 0, "end": 10},
                {"peer": "s", "addr": "", "start": 10, "end": 30}]}, "gives this stage layers 10:30"),
    ({"dtype": "bfloat16"}, "dtype mismatch"),
    ({"max_model_len": 4096}, "max_model_len"),
    ({"max_num_seqs": 1000}, "larger limits"),
])
def test_stage_refuses_a_session_it_cannot_serve(stages, change, needle):
    """Protocol refusals, against the running float32 stage (which goes on serving: the next test
    uses it); a matching probe is accepted."""
    t, body = _hello(stages["float32"], **change)
    assert t == "eng.error" and needle in body["message"], (t, body)
    assert stages["float32"].proc.poll() is None


def test_stage_accepts_a_matching_probe(stages):
    t, body = _hello(stages["float32"])
    assert t == "eng.hello_ok", (t, body)
    assert [(s["start"], s["end"]) for s in body["stages"]] == [(15, 30)] and body["stages"][0]["max_blocks"] > 0


@pytest.fixture(scope="module")
def pipeline_run(model_dir, stages, tmp_path_factory):
    """A float32 pipeline head (the driver) through the stage."""
    job = BackgroundJob([sys.executable, str(DRIVER), json.dumps(spec(
        model_dir, "float32", route_for([(0, 15), (15, 30)], [stages["float32"]]), batch=True, logprobs=3))],
        tmp_path_factory.mktemp("pipeline_run"), "driver-f32")
    yield job
    job.stop()


def test_two_stages_match_single_node_f32(pipeline_run, f32_reference):
    got = pipeline_run.result()
    assert got["one"] == f32_reference["one"]
    # several concurrent requests in one batch: the same texts, every request the full length
    assert got["batch"] == f32_reference["batch"]
    assert got["batch_tokens"] == f32_reference["batch_tokens"] == [MAX_TOKENS] * len(F32_PROMPTS)
    # logprobs and prompt logprobs survive the trip from the last stage
    assert [sorted(d) for d in got["logprobs"]] == [sorted(d) for d in f32_reference["logprobs"]]
    for a, b in zip(got["logprobs"], f32_reference["logprobs"]):
        for t in a:
            assert a[t] == pytest.approx(b[t], abs=1e-2)
    assert got["prompt_logprobs"] == f32_reference["prompt_logprobs"]
