"""The head's watch over its route: a stage that stops announcing itself ends the pipeline."""

from __future__ import annotations

import types

import pytest

from molinkd import service
from molinkd.service import RouteLost, route_watch

HOPS = [{"peer": "head"}, {"peer": "s1"}, {"peer": "s2"}]


def _daemon(*online: str, throughput: float = 50.0, measured: dict | None = None):
    recs = [types.SimpleNamespace(peer_id=p, online=True, throughput=throughput) for p in online]
    return types.SimpleNamespace(disc=types.SimpleNamespace(snapshot=lambda: recs), banned={},
                                 measured=lambda p: (measured or {}).get(p),
                                 cfg=types.SimpleNamespace(ban_seconds=30.0),
                                 metrics=types.SimpleNamespace(banned=lambda *a: None))


def test_a_complete_route_passes() -> None:
    route_watch(_daemon("s1", "s2"), HOPS, grace=0)()  # the head itself need not be in its own table


def test_a_missing_stage_is_reported_after_the_grace_period() -> None:
    check = route_watch(_daemon("s1"), HOPS, grace=0)
    with pytest.raises(RouteLost) as ei:
        check()
    assert ei.value.peer == "s2" and "stopped announcing" in str(ei.value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(service, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


def test_a_stage_missing_for_less_than_the_grace_period_passes_then_is_reported(clock) -> None:
    check = route_watch(_daemon("s1"), HOPS, grace=4.0)
    check()
    clock.now += 3.9
    check()  # missing, but not for long
    clock.now += 0.2
    with pytest.raises(RouteLost):
        check()


def test_a_stage_that_comes_back_within_the_grace_period_is_forgiven(clock) -> None:
    d = _daemon("s1")
    check = route_watch(d, HOPS, grace=4.0)
    check()  # s2 missing since now
    clock.now += 3.0
    d.disc.snapshot = lambda: [types.SimpleNamespace(peer_id=p, online=True, throughput=50.0) for p in ("s1", "s2")]
    check()  # back: its missing time is forgotten
    d.disc.snapshot = lambda: [types.SimpleNamespace(peer_id="s1", online=True, throughput=50.0)]
    clock.now += 3.0
    check()  # missing again for 0 s, not 6 s: no error
    clock.now += 3.0
    check()  # 3 s this time
    clock.now += 1.0
    with pytest.raises(RouteLost):
        check()  # 4 s: reported


def test_an_offline_record_counts_as_missing(clock) -> None:
    d = _daemon("s1", "s2")
    d.disc.snapshot = lambda: [types.SimpleNamespace(peer_id="s1", online=True, throughput=50.0),
                               types.SimpleNamespace(peer_id="s2", online=False, throughput=50.0)]
    check = route_watch(d, HOPS, grace=1.0)
    check()
    clock.now += 1.0
    with pytest.raises(RouteLost):
        check()


def test_a_stage_announcing_far_more_than_measured_is_banned_as_a_liar() -> None:
    from molinkd.trust import MIN_STEPS, Measured

    slow = Measured(step_ms=40.0, steps=MIN_STEPS)
    honest = _daemon("s1", "s2", throughput=50.0, measured={"s2": slow})
    route_watch(honest, HOPS, grace=0)()
    assert honest.banned == {}
    liar = _daemon("s1", "s2", throughput=1e6, measured={"s2": slow})
    route_watch(liar, HOPS, grace=0)()  # the pipeline goes on: it computes, only routes avoid it now
    assert list(liar.banned) == ["s2"] and "lied about its speed" in liar.banned["s2"][1]
    early = _daemon("s1", "s2", throughput=1e6, measured={"s2": Measured(step_ms=40.0, steps=MIN_STEPS - 1)})
    route_watch(early, HOPS, grace=0)()
    assert early.banned == {}
