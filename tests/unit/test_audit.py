"""Audits (molinkd.audit): which requests can be checked, where their rows are, how a check is
judged, and when disagreements ban (the quorum); the daemon's check of an engine's audit report."""

import pytest

from molinkd.audit import DEFAULT_TOLERANCE, RARE, AuditLedger, auditable, judge, rows_of
from molinkd.bridge import check_audit_report


def _new(req="r", prompt=(1, 2, 3, 4), computed=0, **sp_kw):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    sp = SamplingParams(max_tokens=4, **{"temperature": 0.0, **sp_kw})
    return NewRequestData(req_id=req, prompt_token_ids=list(prompt), mm_features=[], sampling_params=sp,
                          pooling_params=None, block_ids=([0],), num_computed_tokens=computed, lora_request=None)


def test_only_whole_prompts_from_position_0_with_plain_sampling_are_auditable():
    assert auditable(_new(), 4)
    assert auditable(_new(temperature=0.8, top_p=0.9, top_k=40, presence_penalty=1.0), 4)  # no effect on token 1
    assert not auditable(_new(), 3)  # a chunked prefill: this step samples nothing
    assert not auditable(_new(computed=2), 2)  # prefix cache hit: the verifier has no KV for it
    assert not auditable(_new(prompt=()), 0)
    for kw in (dict(repetition_penalty=1.2), dict(logit_bias={5: 3.0}), dict(allowed_token_ids=[1, 2]),
               dict(min_tokens=2)):
        assert not auditable(_new(**kw), 4), kw
    r = _new()
    r.sampling_params = None
    assert not auditable(r, 4)


def test_rows_follow_the_runner_batch_order():
    sched = {"a": 3, "b": 5, "c": 1}
    assert rows_of(["b", "a", "c"], sched, "b") == (0, 5)
    assert rows_of(["b", "a", "c"], sched, "a") == (5, 8)
    assert rows_of(["b", "a", "c"], sched, "c") == (8, 9)
    with pytest.raises(KeyError):
        rows_of(["a", "b"], sched, "zz")


def test_greedy_verdicts_use_the_tolerance():
    same = judge(7, 7, -0.5, -0.5, temperature=0.0)
    assert same.agree and same.gap == 0.0
    close = judge(7, 9, -0.5, -0.5 - (DEFAULT_TOLERANCE - 0.1), temperature=0.0)
    assert close.agree  # another CPU's bf16 kernels may swap two near-equal tokens
    far = judge(7, 9, -0.5, -0.5 - (DEFAULT_TOLERANCE + 0.1), temperature=0.0)
    assert not far.agree and "route token 7" in far.detail and "greedy" in far.detail
    assert not judge(7, 9, -0.1, -30.0, temperature=0.0, tolerance=10.0).agree
    with pytest.raises(ValueError):
        judge(7, 9, float("nan"), -1.0, temperature=0.0)


def test_sampled_verdicts_only_refuse_tokens_an_honest_sampler_would_almost_never_draw():
    import math

    vocab = 49152
    edge = DEFAULT_TOLERANCE + math.log(vocab) + RARE  # ~26.6 nats at T=1
    # 20 nats below the best: each such token is rare, but 49152 of them together are not
    assert judge(7, 9, -0.1, -20.1, temperature=1.0, candidates=vocab).agree
    assert not judge(7, 9, -0.1, -0.1 - edge - 0.5, temperature=1.0, candidates=vocab).agree
    assert judge(7, 9, -0.1, -0.1 - edge + 0.5, temperature=1.0, candidates=vocab).agree
    # top-k=5 leaves 5 candidates: the allowance shrinks; so does a lower temperature
    assert not judge(7, 9, -0.1, -20.1, temperature=1.0, candidates=5).agree
    assert not judge(7, 9, -0.1, -20.1, temperature=0.5, candidates=vocab).agree
    assert judge(7, 9, -0.1, -20.1, temperature=2.0, candidates=vocab).agree


def test_an_exact_blame_bans_at_the_quorum_of_distinct_verifier_routes():
    led = AuditLedger(quorum=2)
    assert led.record_disagreement(["liar"], ["v1"], now=0.0) is None
    assert led.record_disagreement(["liar"], ["v1"], now=1.0) is None  # the same witness again: still one
    assert led.pending() == {"liar": 1} and led.witnesses(["liar"]) == {"v1"}
    assert led.record_disagreement(["liar"], ["v2"], now=2.0) == ("ban", ("liar",))
    assert led.pending() == {}
    one = AuditLedger(quorum=1)
    assert one.record_disagreement(["liar"], ["v1"], now=0.0) == ("ban", ("liar",))


def test_a_blame_on_several_stages_only_avoids_them_and_old_witnesses_expire():
    led = AuditLedger(quorum=1)
    assert led.record_disagreement(["b", "a"], ["x", "y"], now=0.0) == ("avoid", ("a", "b"))
    slow = AuditLedger(quorum=2, window=10.0)
    assert slow.record_disagreement(["s"], ["v1"], now=0.0) is None
    assert slow.record_disagreement(["s"], ["v2"], now=50.0) is None  # v1's word is too old
    assert slow.record_disagreement(["s"], ["v3"], now=55.0) == ("ban", ("s",))


def test_the_ledger_is_bounded_and_refuses_nonsense():
    led = AuditLedger(quorum=3, max_suspects=4)
    for i in range(20):
        led.record_disagreement([f"p{i}"], ["v"], now=float(i))
    assert len(led.pending()) == 4 and "p19" in led.pending()
    for blamed, verifiers in (([], ["v"]), (["a"], []), (["a"], ["a", "b"])):
        with pytest.raises(ValueError):
            led.record_disagreement(blamed, verifiers)
    with pytest.raises(ValueError):
        AuditLedger(quorum=0)


def test_the_daemon_checks_an_engine_audit_report():
    ok = check_audit_report({"outcome": "disagree", "blamed": ["a"], "verifiers": ["b"], "detail": "x" * 900})
    assert ok["outcome"] == "disagree" and len(ok["detail"]) == 500
    assert check_audit_report({"outcome": "skipped", "blamed": ["a"], "verifiers": []})["detail"] == ""
    for bad in (None, {"outcome": "maybe", "blamed": [], "verifiers": []},
                {"outcome": "agree", "blamed": "a", "verifiers": []},
                {"outcome": "agree", "blamed": [1], "verifiers": []},
                {"outcome": "agree", "blamed": ["p"] * 65, "verifiers": []},
                {"outcome": "disagree", "blamed": [], "verifiers": ["b"]}):
        with pytest.raises(ValueError):
            check_audit_report(bad)


def test_the_auditor_keeps_one_requests_rows_and_audits_off_the_engine_thread(monkeypatch):
    """No daemon here: the audit is counted as skipped (no verifier route), nothing else happens."""
    import random
    import threading
    import time
    from types import SimpleNamespace

    import torch
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    from molinkd.engine.audit import Auditor

    monkeypatch.delenv("MOLINK_P2P_DIAL", raising=False)
    ex = SimpleNamespace(_stop=threading.Event(), route=[{"peer": "h"}, {"peer": "s"}])
    aud = Auditor(ex, rate=1.0, tolerance=2.0, rng=random.Random(1))
    so = SchedulerOutput(scheduled_new_reqs=[_new("a", prompt=(1, 2)), _new("b", prompt=(3, 4, 5))],
                         scheduled_cached_reqs=CachedRequestData.make_empty(), num_scheduled_tokens={"a": 2, "b": 3},
                         total_num_scheduled_tokens=5, scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                         finished_req_ids=set(), free_encoder_mm_hashes=[])
    hidden = {"hidden_states": torch.arange(10.0).reshape(5, 2), "residual": torch.zeros(5, 2)}
    aud.consider(3, so, ["b", "a"], hidden)  # the runner's batch put b first
    cap = aud._pending
    assert cap.req_id == "a" and cap.prompt == [1, 2]
    assert cap.rows["hidden_states"].tolist() == [[6.0, 7.0], [8.0, 9.0]]
    hidden["hidden_states"].zero_()  # the engine reuses its buffers: the audit kept a copy
    assert cap.rows["hidden_states"][0, 0] == 6.0
    aud.consider(4, so, ["a", "b"], hidden)
    assert aud._pending is cap  # one audit at a time
    aud.on_result(2, SimpleNamespace(req_id_to_index={"a": 0}, sampled_token_ids=[[11]]))  # another step
    assert aud._pending is cap
    aud.on_result(3, SimpleNamespace(req_id_to_index={"a": 1, "b": 0}, sampled_token_ids=[[10], [11]]))
    assert aud._pending is None
    deadline = time.monotonic() + 10
    while aud.counts["skipped"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aud.counts == {"agree": 0, "disagree": 0, "skipped": 1}
    ex._stop.set()


def test_the_daemon_counts_reports_and_bans_at_the_quorum():
    from types import SimpleNamespace

    from molinkd.metrics import Metrics
    from molinkd.service import _on_audit

    d = SimpleNamespace(metrics=Metrics(), audits=AuditLedger(quorum=2), node=SimpleNamespace(peer_id="me"),
                        banned={}, cfg=SimpleNamespace(ban_seconds=30.0), last_audit=None)

    def rep(outcome, blamed, verifiers):
        return _on_audit(d, check_audit_report({"outcome": outcome, "blamed": blamed, "verifiers": verifiers,
                                                "detail": "route token 1, verifier's best 2: 9.00 nats apart"}))

    assert rep("agree", ["s"], ["v1"]) == {"ban": [], "avoid": []}
    assert rep("skipped", ["s"], []) == {"ban": [], "avoid": []}
    assert rep("disagree", ["s"], ["v1"]) == {"ban": [], "avoid": []} and "s" not in d.banned
    assert rep("disagree", ["s"], ["v2"]) == {"ban": ["s"], "avoid": []}
    assert "returned wrong values" in d.banned["s"][1] and "9.00 nats" in d.banned["s"][1]
    assert rep("disagree", ["a", "b"], ["x"]) == {"ban": [], "avoid": []}
    assert rep("disagree", ["a", "b"], ["y"]) == {"ban": [], "avoid": ["a", "b"]}
    assert "error" in rep("disagree", ["me"], ["v1"])  # an engine cannot get its own head banned
    assert d.metrics.audit_counts() == {"agree": 1, "disagree": 5, "skipped": 1}
    assert d.last_audit["outcome"] == "disagree"
    assert 'molink_audits_total{outcome="disagree"} 5.0' in d.metrics.render().decode()
