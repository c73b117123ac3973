"""The head's watch over its route: a stage that stops announcing itself, or announces a speed the
head measured it does not have, ends the pipeline."""

from __future__ import annotations

import types

import pytest

from molinkd.service import RouteLost, route_watch
from molinkd.trust import MIN_STEPS, Measured

HOPS = [{"peer": "head"}, {"peer": "s1"}, {"peer": "s2"}]


def _daemon(*online: str, throughput: float = 50.0, measured: dict | None = None):
    d = types.SimpleNamespace(measured=lambda p: (measured or {}).get(p), banned={}, route=None,
                              engine_replanning_at=-1e18, engine_pipes=set(),
                              cfg=types.SimpleNamespace(ban_seconds=30.0),
                              metrics=types.SimpleNamespace(banned=lambda *a: None))
    d.set_online = lambda *peers: setattr(d, "disc", types.SimpleNamespace(snapshot=lambda: [
        types.SimpleNamespace(peer_id=p, online=True, throughput=throughput) for p in peers]))
    d.set_online(*online)
    return d


def test_a_complete_route_passes() -> None:
    route_watch(_daemon("s1", "s2"), HOPS, grace=0)()  # the head itself need not be in its own table


class _Scope:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_missing_stage_cuts_the_engine_streams_then_is_reported(monkeypatch) -> None:
    """First the engine's streams are cut (it fails over by itself); if it does not take over
    within ENGINE_CUT_GRACE, the stage is reported lost (the engine is restarted)."""
    from molinkd import service

    d = _daemon("s1")
    scope = _Scope()
    d.engine_pipes.add(scope)
    check = route_watch(d, HOPS, grace=0)
    check()
    assert scope.cancelled
    monkeypatch.setattr(service, "ENGINE_CUT_GRACE", 0.0)
    with pytest.raises(RouteLost) as ei:
        check()
    assert ei.value.peer == "s2" and "stopped announcing" in str(ei.value)


def test_a_stage_that_comes_back_within_the_grace_period_is_forgiven() -> None:
    d = _daemon("s1")
    check = route_watch(d, HOPS, grace=0.5)
    check()  # missing since now, but not for long
    d.set_online("s1", "s2")
    check()  # back: its missing time is forgotten
    d.set_online("s1")
    check()  # missing again: the grace starts over instead of counting from the first absence
    import time

    time.sleep(0.6)
    check()  # missing past the grace: the engine's streams are cut first
    assert d.route is None


def test_the_watch_follows_the_route_in_use() -> None:
    """After an in-engine failover the daemon's route is the new one: the lost stage no longer counts."""
    d = _daemon("s1", "s3")
    check = route_watch(d, HOPS, grace=0)
    d.route = [{"peer": "head"}, {"peer": "s1"}, {"peer": "s3"}]
    check()
    d.route = None  # no route given: the engine's first route
    scope = _Scope()
    d.engine_pipes.add(scope)
    check()
    assert scope.cancelled


def test_no_verdict_while_the_engine_replans_its_route() -> None:
    """The head's engine asks for routes while it fails over: the daemon does not stop it meanwhile."""
    import time

    d = _daemon("s1")
    d.engine_replanning_at = time.monotonic()
    route_watch(d, HOPS, grace=0)()  # s2 is missing, but the engine is on it


def test_a_stage_announcing_far_more_than_measured_is_banned_as_a_liar() -> None:
    slow = Measured(step_ms=40.0, steps=MIN_STEPS)
    honest = _daemon("s1", "s2", throughput=50.0, measured={"s2": slow})
    route_watch(honest, HOPS, grace=0)()
    assert honest.banned == {}
    liar = _daemon("s1", "s2", throughput=1e6, measured={"s2": slow})
    route_watch(liar, HOPS, grace=0)()  # the pipeline goes on: it computes, only routes avoid it now
    assert list(liar.banned) == ["s2"] and "lied about its speed" in liar.banned["s2"][1]
    # too few steps measured yet: no verdict
    early = _daemon("s1", "s2", throughput=1e6, measured={"s2": Measured(step_ms=40.0, steps=MIN_STEPS - 1)})
    route_watch(early, HOPS, grace=0)()
    assert early.banned == {}


def test_a_stage_that_said_goodbye_is_cut_at_once_a_silent_one_after_the_grace() -> None:
    """A goodbye (offline record) means the stage is draining: the engine's streams are cut on the
    first check, with no grace; a stage that merely went quiet gets the grace."""
    d = _daemon("s1")
    scope = _Scope()
    d.engine_pipes.add(scope)
    check = route_watch(d, HOPS, grace=3600)
    check()
    assert not scope.cancelled  # s2 is silent, not gone: within the grace
    d.disc.departed = {"s2": 0.0}
    check()
    assert scope.cancelled
