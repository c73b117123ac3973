"""The route a head's engine accepts from its daemon during a failover."""

from __future__ import annotations

import pytest

from molinkd.engine.failover import RouteUnavailable, check_route

HEAD = {"peer": "H", "addr": "", "start": 0, "end": 10}


def hop(peer, start, end, addr=None):
    return {"peer": peer, "addr": f"p2p:{peer}" if addr is None else addr, "start": start, "end": end}


def test_a_good_route_passes():
    check_route([dict(HEAD), hop("B", 10, 20), hop("C", 20, 30)], HEAD, 30)


@pytest.mark.parametrize("route,match", [
    ([dict(HEAD)], "route of"),
    ("nope", "route of"),
    ([dict(HEAD), hop("B", 10, 20)], "ends at layer 20"),
    ([dict(HEAD), hop("B", 12, 30)], "expected to start at 10"),
    ([dict(HEAD), hop("B", 10, 30, addr="tcp:1.2.3.4:5")], "address"),
    ([dict(HEAD, peer="X"), hop("B", 10, 30)], "does not start with this head"),
    ([dict(HEAD), {"peer": "B", "start": 10, "end": 30}], "malformed"),
])
def test_bad_routes_are_refused(route, match):
    with pytest.raises(RouteUnavailable, match=match):
        check_route(route, HEAD, 30)
