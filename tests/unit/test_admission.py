"""Who may open an engine session on a stage, and whom it may dial (pure checks)."""

from __future__ import annotations

import copy

import pytest

from molinkd.engine import wire
from molinkd.engine.admission import AdmissionError, admit, next_hop_addr, same_session

HEAD = "12D3KooWHeadHeadHeadHeadHeadHeadHeadHeadHeadHead1"
MID = "12D3KooWMidMidMidMidMidMidMidMidMidMidMidMidMid2"
LAST = "12D3KooWLastLastLastLastLastLastLastLastLastLas3"
EVIL = "12D3KooWBadBadBadBadBadBadBadBadBadBadBadBadBad4"


def body(stage: int = 1, **route_changes) -> dict:
    route = [
        {"peer": HEAD, "addr": f"p2p:{HEAD}", "start": 0, "end": 10},
        {"peer": MID, "addr": f"p2p:{MID}", "start": 10, "end": 20},
        {"peer": LAST, "addr": f"p2p:{LAST}", "start": 20, "end": 30},
    ]
    for i, changes in route_changes.items():
        route[int(i[1:])].update(changes)
    return wire.session_body(session="s1", model_hash="abc", route=route, num_layers=30, dtype="bfloat16",
                             max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=2048, block_size=16,
                             stage=stage)


def mid(b: dict, opener: str | None = HEAD, me: str = MID):
    return admit(b, me=me, span=(10, 20), num_layers=30, model_hash="abc", opener=opener)


def test_admits_the_route_previous_hop():
    a = mid(body())
    assert (a.head, a.index, a.previous, a.next) == (HEAD, 1, HEAD, LAST)
    last = admit(body(stage=2), me=LAST, span=(20, 30), num_layers=30, model_hash="abc", opener=MID)
    assert last.previous == MID and last.next is None


def test_refuses_a_peer_that_is_not_the_previous_hop():
    with pytest.raises(AdmissionError, match="previous hop"):
        mid(body(), opener=EVIL)
    # the last stage only takes sessions from the middle stage, even when the head itself asks
    with pytest.raises(AdmissionError, match="previous hop"):
        admit(body(stage=2), me=LAST, span=(20, 30), num_layers=30, model_hash="abc", opener=HEAD)


def test_refuses_a_route_that_puts_someone_else_here():
    with pytest.raises(AdmissionError, match="not this peer"):
        mid(body(), me=LAST)
    with pytest.raises(AdmissionError, match="serves"):
        admit(body(), me=MID, span=(10, 30), num_layers=30, model_hash="abc", opener=HEAD)


@pytest.mark.parametrize("addr", ["tcp:10.0.0.7:22", "unix:/run/docker.sock", f"p2p:{EVIL}", "p2p:"])
def test_refuses_network_chosen_addresses(addr):
    with pytest.raises(AdmissionError, match="address"):
        mid(body(h2={"addr": addr}))


def test_refuses_foreign_models_malformed_and_repeated_peers():
    b = body()
    b["model_hash"] = "other"
    with pytest.raises(AdmissionError, match="model hash"):
        mid(b)
    b = body()
    b["num_layers"] = 31
    with pytest.raises(AdmissionError):
        mid(b)
    with pytest.raises(AdmissionError, match="peer id"):
        mid(body(h2={"peer": "not a peer id!", "addr": ""}))
    with pytest.raises(AdmissionError, match="twice"):
        mid(body(h0={"peer": LAST, "addr": ""}), opener=LAST)
    with pytest.raises(AdmissionError, match="malformed"):
        mid({"route": "x"})


def test_next_hop_is_a_peer_id_or_the_local_flag():
    assert next_hop_addr(body(), None) == (f"p2p:{LAST}", (20, 30))
    assert next_hop_addr(body(), "unix:/tmp/next.sock") == ("unix:/tmp/next.sock", (20, 30))
    with pytest.raises(AdmissionError):
        next_hop_addr(body(h2={"peer": "stage-20"}), None)


def test_a_connection_keeps_its_session():
    first = mid(body())
    same_session(first, body())
    other = copy.deepcopy(body())
    other["session"] = "s2"
    with pytest.raises(AdmissionError, match="one session"):
        same_session(first, other)


def test_local_harness_without_identities_checks_spans_only():
    b = body(h2={"peer": "stage-20", "addr": "unix:/tmp/x.sock"})
    a = admit(b, me="", span=(10, 20), num_layers=30, model_hash="", opener=None)
    assert a.index == 1
