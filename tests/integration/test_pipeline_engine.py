"""End to end: a vLLM pipeline head [0,15) + a stage process [15,30) give exactly the greedy
outputs of single-node vLLM on the same model (the 3-stage chain runs through daemons in
test_pipeline_swarm.py).

float32 is used where batches are compared (bf16 greedy output depends on batch composition,
design.md section 4); one-at-a-time generation is compared in bf16 too. The references are
computed in the same run on the same machine (conftest.py).
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import F32_PROMPTS, MAX_TOKENS, PROMPTS
from tests.integration.pipeline_helpers import Stage, route_for, run_driver

pytestmark = pytest.mark.slow


def spec(model_dir, dtype, route=None, prompts=F32_PROMPTS, **kw):
    return {"model": model_dir, "dtype": dtype, "route": route, "prompts": prompts, "max_tokens": MAX_TOKENS, **kw}


@pytest.fixture(scope="module")
def stages(model_dir, tmp_path_factory, f32_reference_job):
    """A float32 and a bfloat16 stage for layers 15:30, loading in parallel (and with the float32
    reference)."""
    tmp = tmp_path_factory.mktemp("pipeline_engine")
    (tmp / "f32").mkdir()
    (tmp / "bf16").mkdir()
    started = [Stage(model_dir, "15:30", tmp / "f32", dtype="float32"), Stage(model_dir, "15:30", tmp / "bf16")]
    try:
        for s in started:
            s.wait_ready()
        yield {"float32": started[0], "bfloat16": started[1]}
    finally:
        for s in started:
            s.stop()


def test_stage_refuses_wrong_span(model_dir, stages):
    """A head whose route gives a running stage other layers than it holds is refused (and the
    stage goes on serving: the next test uses it)."""
    st = stages["float32"]
    with pytest.raises(RuntimeError, match="route gives this stage 10:30"):
        run_driver(spec(model_dir, "float32", route_for([(0, 10), (10, 30)], [st]), prompts=PROMPTS[:1]),
                   timeout=300)
    assert st.proc.poll() is None


def test_two_stages_match_single_node_f32(model_dir, stages, f32_reference):
    got = run_driver(spec(model_dir, "float32", route_for([(0, 15), (15, 30)], [stages["float32"]]), batch=True,
                          logprobs=3))
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


def test_two_stages_match_plain_vllm_bf16_one_at_a_time(model_dir, stages, plain_vllm_outputs):
    got = run_driver(spec(model_dir, "bfloat16", route_for([(0, 15), (15, 30)], [stages["bfloat16"]]),
                          prompts=PROMPTS))
    assert got["one"] == plain_vllm_outputs
