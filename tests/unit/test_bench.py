"""Pure parts of `molink bench`: the WAN link's timing model, the load generator's summaries, core
plans, flags, the report; the micro-batch split of the pipeline head's scheduler."""

from __future__ import annotations

import pytest

from molinkd.bench.load import BatchResult, RequestTiming, gaps_during, make_prompt, parse_sse_line, percentile
from molinkd.bench.procs import BenchError, pinning_env, plan_cores
from molinkd.bench.wanlink import LinkModel


def test_delay_only_link_holds_each_chunk_for_the_delay():
    m = LinkModel(delay=0.025)
    assert m.deliver_at(100, now=1.0) == pytest.approx(1.025)
    assert m.deliver_at(5000, now=1.001) == pytest.approx(1.026)
    assert m.deliver_at(1, now=2.0) == pytest.approx(2.025)


def test_rate_serialises_chunks_behind_each_other():
    m = LinkModel(delay=0.010, rate_bps=8e6)  # 1 MB/s: 1000 bytes take 1 ms on the wire
    assert m.deliver_at(1000, now=0.0) == pytest.approx(0.011)
    # arrives while the first is still being sent: waits for the wire, then its own 1 ms
    assert m.deliver_at(1000, now=0.0005) == pytest.approx(0.012)
    # the wire is idle again by then
    assert m.deliver_at(1000, now=1.0) == pytest.approx(1.011)


def test_delivery_order_is_kept_when_the_delay_shrinks():
    m = LinkModel(delay=0.050)
    first = m.deliver_at(10, now=0.0)
    m.set(0.0, None)
    second = m.deliver_at(10, now=0.001)
    assert second >= first


def test_link_model_rejects_bad_settings():
    with pytest.raises(ValueError):
        LinkModel(delay=-1)
    with pytest.raises(ValueError):
        LinkModel(delay=0, rate_bps=0)


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4, 5], 100) == 5


def test_request_timing_and_batch_summary():
    r = RequestTiming(start=10.0, token_times=[10.2, 10.3, 10.4, 10.5], tokens=4, prompt_tokens=16)
    assert r.ttft == pytest.approx(0.2)
    assert r.tpot == pytest.approx(0.1)
    assert r.gaps() == pytest.approx([0.1, 0.1, 0.1])
    res = BatchResult(batch=2, wall_s=2.0, requests=[r, RequestTiming(start=10.0, token_times=[10.4], tokens=1)])
    s = res.summary()
    assert s["tok_s"] == pytest.approx(2.5)
    assert s["ttft_ms_p50"] == pytest.approx(300.0)
    assert s["tpot_ms_p50"] == pytest.approx(100.0)  # the one-token request has no TPOT
    assert s["prompt_tokens"] == 16


def test_gaps_during_a_long_prefill_are_those_overlapping_it():
    a = RequestTiming(start=0.0, token_times=[1.0, 1.1, 1.9, 2.0, 2.1], tokens=5)
    b = RequestTiming(start=0.0, token_times=[1.05, 1.15], tokens=2)  # done before the long prompt came
    assert gaps_during([a, b], start=1.5, end=1.95) == pytest.approx([0.8, 0.1])
    long = RequestTiming(start=1.5, token_times=[1.95, 2.05], tokens=2, prompt_tokens=2000)
    s = BatchResult(batch=2, wall_s=1.1, requests=[a, b], long=long).summary()
    assert s["long_prompt_tokens"] == 2000 and s["long_ttft_ms"] == pytest.approx(450.0)
    assert s["long_gap_ms_max"] == pytest.approx(800.0) and s["long_gaps"] == 2
    # a batch without a long prompt says nothing of it
    assert "long_gap_ms_p99" not in BatchResult(batch=2, wall_s=1.1, requests=[a, b]).summary()


def test_sse_lines():
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}
    with pytest.raises(Exception, match="not JSON"):
        parse_sse_line("data: {nope")


def test_prompts_are_distinct_from_their_first_word_and_scale_with_length():
    a, b = make_prompt(0, 64), make_prompt(1, 64)
    assert a.split()[:2] != b.split()[:2]
    assert len(make_prompt(0, 512).split()) > 4 * len(make_prompt(0, 64).split())


def test_core_plan_gives_each_peer_its_own_cores():
    assert plan_cores(2, 1, [0, 1]) == [[0], [1]]
    assert plan_cores(2, 2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    with pytest.raises(BenchError, match="need 3 cores"):
        plan_cores(3, 1, [0, 1])
    assert pinning_env([2, 3]) == {"OMP_NUM_THREADS": "2", "VLLM_CPU_OMP_THREADS_BIND": "2,3"}


def test_bench_flags():
    import argparse

    from molinkd.bench.cli import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["bench", "--batch", "1,16,32", "--rtt-ms", "50", "--json"])
    assert a.batch == (1, 16, 32) and a.rtt_ms == 50 and a.json and a.stages == 2
    for bad in (["bench", "--batch", "0"], ["bench", "--rtt-ms", "-1"], ["bench", "--stages", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_options_validation():
    from molinkd.bench.runner import BenchOptions

    with pytest.raises(BenchError, match="--stages"):
        BenchOptions(stages=1).validate()
    with pytest.raises(BenchError, match="--max-tokens"):
        BenchOptions(max_tokens=1).validate()
    assert BenchOptions(rtt_ms=50).linked and not BenchOptions().linked


def _setup(name, tok, ttft=100.0, tpot=20.0):
    from molinkd.bench.runner import Setup

    s = Setup(name)
    for b, t in tok.items():
        s.rows[b] = {"tok_s": t, "ttft_ms_p50": ttft, "tpot_ms_p50": tpot, "gap_ms_p99": 30.0, "prompt_tokens": 16}
    return s


def test_report_has_the_json_fields_and_ratios():
    from molinkd.bench.runner import BenchOptions, render_table, report

    o = BenchOptions(batches=(1, 16), rtt_ms=50)
    base = _setup("single", {1: 10.0, 16: 100.0})
    plain = _setup("swarm", {1: 12.0, 16: 160.0})
    plain.info = {"inflight_batches": 3, "round_trip_ms": 20.0}
    delayed = _setup("swarm 50", {1: 6.0, 16: 120.0}, tpot=70.0)
    delayed.info = {"inflight_batches": 3, "link_rtt_ms_seen": [50.3]}
    res = report(o, base, [plain, delayed])
    for k in ("baseline_tok_s", "swarm_tok_s", "swarm_nodelay_tok_s", "ttft_ms_p50", "tpot_ms_p50",
              "inflight_batches", "stages", "batch", "rtt_ms"):
        assert k in res, k
    assert res["batch"] == 16 and res["swarm_tok_s"] == 120.0 and res["swarm_nodelay_tok_s"] == 160.0
    assert res["rows"][0]["swarm_vs_baseline"] == pytest.approx(1.2)
    assert res["rows"][1]["delay_vs_nodelay"] == pytest.approx(0.75)
    assert res["tpot_ms_p50"] == 70.0
    table = render_table(res)
    assert "50 ms tok/s" in table and "160.0" in table
    assert res["suggested_spans"] is None  # no stage times measured
    # measured stage steps: the spans that would even them out, said in the table
    plain.info.update(spans=[(0, 15), (15, 30)], stage_ms=[28.3, 21.8])
    res = report(o, base, [plain, delayed])
    assert res["spans"] == "0:15,15:30" and res["suggested_spans"] == "0:13,13:30"
    assert "stage steps [28.3, 21.8] ms with spans 0:15,15:30 (no delay): --spans 0:13,13:30 would even them out" \
        in render_table(res)
    # without a link: no delayed column, the swarm figures are the plain ones
    res2 = report(BenchOptions(batches=(16,)), base, [plain])
    assert res2["swarm_tok_s"] == res2["swarm_nodelay_tok_s"] == 160.0 and res2["rows"][0]["delay_vs_nodelay"] is None
    assert "long_gap_ms_p99" not in res2


def test_report_of_a_long_prompt_arriving_mid_decode():
    from molinkd.bench.runner import BenchOptions, render_table, report

    base = _setup("single", {16: 100.0})
    plain = _setup("swarm", {16: 160.0})
    base.rows[16].update(long_gap_ms_p99=90.0, long_gap_vs_gap=3.0, long_ttft_ms=900.0)
    plain.rows[16].update(long_gap_ms_p99=45.0, long_gap_vs_gap=1.5, long_ttft_ms=1500.0, long_prompt_tokens=2000)
    res = report(BenchOptions(batches=(16,), long_prompt=2000), base, [plain])
    assert res["long_prompt"] == 2000 and res["long_gap_vs_gap"] == 1.5 and res["baseline_long_gap_vs_gap"] == 3.0
    assert "2000-token prompt" in render_table(res) and "(x1.50)" in render_table(res)
    with pytest.raises(BenchError, match="long-prompt"):
        BenchOptions(long_prompt=100000).validate()


def test_micro_batch_split():
    from molinkd.engine.microbatch import micro_batch_cap, split_ready

    assert micro_batch_cap(16, 2) == 8
    assert micro_batch_cap(16, 3) == 6
    assert micro_batch_cap(1, 3) == 1
    assert micro_batch_cap(5, 1) == 5
    # 4 ready decodes, cap 2: the last two wait
    assert split_ready([True] * 4, [True] * 4, 2) == [2, 3]
    # in-flight requests (not ready) and prefills do not count and are never held
    assert split_ready([False, True, True, True], [True, False, True, True], 1) == [3]
    assert split_ready([False, False], [True, True], 1) == []


def test_empty_steps_that_say_nothing_are_recognised():
    from vllm.v1.core.sched.output import SchedulerOutput

    from molinkd.engine.head import says_nothing

    so = SchedulerOutput.make_empty()
    assert says_nothing(so)
    so.finished_req_ids = {"r1"}  # a finished request must reach every stage (it frees state there)
    assert not says_nothing(so)
    so = SchedulerOutput.make_empty()
    so.preempted_req_ids = {"r2"}
    assert not says_nothing(so)


def test_pipeline_depth_defaults_and_override(monkeypatch):
    from molinkd.engine.head import DEPTH_ENV, default_depth, pipeline_engine_kwargs

    route = [{"peer": "a", "addr": "", "start": 0, "end": 15}, {"peer": "b", "addr": "p2p:b", "start": 15, "end": 30}]
    monkeypatch.delenv(DEPTH_ENV, raising=False)
    assert default_depth(2) == 2 and default_depth(3) == 3
    kw = pipeline_engine_kwargs(route)
    assert kw["pipeline_parallel_size"] == 2 and kw["additional_config"]["molink_pipeline"]["depth"] == 2
    assert kw["scheduler_cls"].endswith("MicroBatchScheduler")
    assert pipeline_engine_kwargs(route, depth=5)["pipeline_parallel_size"] == 5
    with pytest.raises(ValueError, match="at least 2"):
        pipeline_engine_kwargs(route, depth=1)
    monkeypatch.setenv(DEPTH_ENV, "4")
    assert pipeline_engine_kwargs(route)["pipeline_parallel_size"] == 4
    monkeypatch.setenv(DEPTH_ENV, "one")
    with pytest.raises(ValueError, match=DEPTH_ENV):
        pipeline_engine_kwargs(route)


def test_long_prompts_are_prefilled_in_depth_chunks():
    from molinkd.engine.microbatch import MIN_PREFILL_CHUNK, prefill_chunk, step_token_budget

    assert prefill_chunk(512, 2) == 256
    assert prefill_chunk(2048, 3) == 683
    assert prefill_chunk(100, 2) == 100  # short prompts go whole
    assert prefill_chunk(200, 8) == MIN_PREFILL_CHUNK
    assert prefill_chunk(512, 1) == 512
    # the same chunk size every step of a prompt (not a share of what is left)
    assert step_token_budget(2048, 0, [(512, 512)], 2) == 256
    assert step_token_budget(2048, 0, [(512, 256)], 2) == 256
    assert step_token_budget(2048, 0, [(512, 100)], 2) == 100
    # decodes of the step come on top; the engine's budget stays the ceiling; no prompt: no cap
    assert step_token_budget(2048, 8, [(512, 512)], 2) == 264
    assert step_token_budget(300, 8, [(4096, 4096)], 2) == 300
    assert step_token_budget(2048, 8, [], 2) == 2048
    assert step_token_budget(2048, 0, [(16, 16)] * 16, 2) == 256
    # while requests decode the pacer caps the prompt tokens of a step (all prompts together)
    assert step_token_budget(2048, 8, [(2048, 2048)], 2, paced=32) == 40
    assert step_token_budget(2048, 8, [(2048, 2048), (512, 512)], 2, paced=32) == 40
    assert step_token_budget(2048, 8, [(2048, 10)], 2, paced=32) == 18  # the last bit of a prompt
    assert step_token_budget(2048, 8, [], 2, paced=32) == 2048
    # short prompts (never cut) go whole, paced or not: 4 prompts of 5 tokens and a 2048-token one
    assert step_token_budget(2048, 8, [(5, 5)] * 4, 2, paced=16) == 28
    assert step_token_budget(2048, 8, [(5, 5)] * 4 + [(2048, 2048)], 2, paced=16) == 44


def test_a_head_may_start_on_its_own_hop_only_when_it_waits_for_the_rest():
    from molinkd.engine.head import CONFIG_KEY, pipeline_engine_kwargs

    me = [{"peer": "h", "addr": "p2p:h", "start": 0, "end": 10}]
    with pytest.raises(ValueError, match="at least 2 stages"):
        pipeline_engine_kwargs(me)
    kw = pipeline_engine_kwargs(me, route_wait=300.0, expected_stages=3)
    assert kw["additional_config"][CONFIG_KEY]["route_wait"] == 300.0
    assert kw["pipeline_parallel_size"] == 3  # the depth of the route it expects, not of its lone hop
