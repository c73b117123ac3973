"""The layers a head's 503 names when no route exists (the daemon's view of the swarm)."""

from __future__ import annotations

import types

from molinkd.service import _uncovered


def _rec(peer, start, end, *, ready=True, holder=None):
    extras = {"role": "stage", "engine": "ready" if ready else "loading"}
    if holder:
        extras["serving_head"] = holder
    return types.SimpleNamespace(peer_id=peer, span_start=start, span_end=end, online=True, extras=extras,
                                 active_requests=0, throughput=10.0, model_hash="h")


def _daemon(*recs):
    return types.SimpleNamespace(disc=types.SimpleNamespace(snapshot=lambda: list(recs)),
                                 node=types.SimpleNamespace(peer_id="me"), cfg=types.SimpleNamespace(max_num_seqs=8),
                                 rtts={}, model=types.SimpleNamespace(num_layers=30), span=(0, 10),
                                 measured=lambda p: None)


def test_names_the_missing_middle_span():
    assert _uncovered(_daemon(_rec("c", 20, 30)), set()) == "10:20"


def test_banned_busy_and_loading_peers_do_not_cover():
    d = _daemon(_rec("b", 10, 20), _rec("b2", 10, 20, ready=False), _rec("b3", 10, 20, holder="other"),
                _rec("c", 20, 30))
    assert _uncovered(d, {"b"}) == "10:20"
    assert _uncovered(d, set()) == "none (spans do not chain)"
    assert _uncovered(_daemon(_rec("b", 10, 15)), set()) == "15:30"
