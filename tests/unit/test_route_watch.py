"""The head's watch over its route: a stage that stops announcing itself ends the pipeline."""

from __future__ import annotations

import types

import pytest

from molinkd.service import RouteLost, route_watch

HOPS = [{"peer": "head"}, {"peer": "s1"}, {"peer": "s2"}]


def _daemon(*online: str):
    recs = [types.SimpleNamespace(peer_id=p, online=True) for p in online]
    return types.SimpleNamespace(disc=types.SimpleNamespace(snapshot=lambda: recs), route=None,
                                 engine_replanning_at=-1e18)


def test_a_complete_route_passes() -> None:
    route_watch(_daemon("s1", "s2"), HOPS, grace=0)()  # the head itself need not be in its own table


def test_a_missing_stage_is_reported_after_the_grace_period() -> None:
    check = route_watch(_daemon("s1"), HOPS, grace=0)
    with pytest.raises(RouteLost) as ei:
        check()
    assert ei.value.peer == "s2" and "stopped announcing" in str(ei.value)


def test_a_stage_that_comes_back_within_the_grace_period_is_forgiven() -> None:
    d = _daemon("s1")
    check = route_watch(d, HOPS, grace=3600)
    check()  # missing, but not for long
    d.disc.snapshot = lambda: [types.SimpleNamespace(peer_id=p, online=True) for p in ("s1", "s2")]
    check()


def test_the_watch_follows_the_route_in_use() -> None:
    """After an in-engine failover the daemon's route is the new one: the lost stage no longer counts."""
    d = _daemon("s1", "s3")
    check = route_watch(d, HOPS, grace=0)
    d.route = [{"peer": "head"}, {"peer": "s1"}, {"peer": "s3"}]
    check()
    d.route = None  # no route given: the engine's first route
    with pytest.raises(RouteLost):
        check()


def test_no_verdict_while_the_engine_replans_its_route() -> None:
    """The head's engine asks for routes while it fails over: the daemon does not stop it meanwhile."""
    import time

    d = _daemon("s1")
    d.engine_replanning_at = time.monotonic()
    route_watch(d, HOPS, grace=0)()  # s2 is missing, but the engine is on it
