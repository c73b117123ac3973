"""Routes are planned with measured speeds; announced ones are capped until measured."""

from molinkd.routing import PeerRecord, plan_route
from molinkd.trust import UNMEASURED_CAP, Measured, lie, measured_from_stats, planning_throughput


def test_unmeasured_announcements_are_capped_and_measurements_win():
    assert planning_throughput(1e9, None) == UNMEASURED_CAP
    assert planning_throughput(10.0, None) == 10.0
    assert planning_throughput(1e9, Measured(step_ms=20.0, steps=5)) == 50.0
    assert planning_throughput(float("nan"), None) > 0


def test_a_big_announcement_no_longer_attracts_the_route():
    head = PeerRecord("head", 0, 15, 50.0, model_hash="m")
    honest = PeerRecord("honest", 15, 30, planning_throughput(40.0, Measured(10.0, 50)), model_hash="m")
    liar = PeerRecord("liar", 15, 30, planning_throughput(1e6, None), model_hash="m")
    assert plan_route(head, [honest, liar], 30).peer_ids == ["head", "honest"]


def test_lie_needs_enough_steps_and_a_wide_margin():
    m = Measured(step_ms=100.0, steps=100)  # 10 tokens/s measured at some batch size
    assert lie(50.0, m) is None  # an honest default announcement
    assert "measured" in lie(5e4, m)
    assert lie(5e4, Measured(100.0, 3)) is None


def test_measured_from_stats_ignores_garbage():
    stats = {"stage_ms": {"a": 12.5, "b": "x", "c": -1, "d": float("inf")}, "steps": 40}
    assert measured_from_stats(stats, "a") == Measured(12.5, 40)
    assert [measured_from_stats(stats, p) for p in "bcdz"] == [None] * 4
