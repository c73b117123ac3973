"""PURE: who may open an engine session on a stage, and whom a stage may dial next.

A stage is useful to strangers only in the ways its operator agreed to: it computes its span for
the head at the front of a route, fed by the peer the route names just before it, and it sends its
hidden states to the peer the route names just after it, reached through our own libp2p node. So a
session body (``eng.hello`` / ``eng.open``, see :mod:`molinkd.engine.wire`) is admitted only if

- the route entry it is addressed to (``route[stage]``) is this peer, with this peer's span;
- the peer that opened the stream, authenticated by libp2p's Noise handshake, is ``route[stage-1]``
  (the head for stage 1): nobody can open a session in another head's name;
- the model (hash, layer count) is ours;
- every address in the route is ``p2p:<that hop's peer id>`` (or empty): a stage never takes a
  ``tcp:`` or ``unix:`` address from the network, so no peer can make it dial an address of its
  choosing (server-side request forgery into the stage's network);
- peer ids look like peer ids and no peer appears twice.

Both the stage's daemon (before it pipes a stream to its stage process or announces a head) and the
stage process (for every hello/open on the connection) run :func:`admit`. No I/O here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from molinkd.engine import wire
from p2p.framing import FrameError

# base58btc peer ids (Ed25519 "12D3KooW...", RSA "Qm..."), generously bounded
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{16,128}$")


class AdmissionError(FrameError):
    """A session that this stage must refuse (the message says why; it goes back to the opener)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    head: str  # route[0]: the scheduler this stage will serve
    index: int  # this stage's position in the route
    previous: str  # route[index - 1]: the only peer allowed to feed this session
    next: str | None  # route[index + 1], None on the last stage
    session: str


def is_peer_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_PEER_ID.match(value))


def p2p_addr(peer: str) -> str:
    return f"p2p:{peer}"


def admit(body: Any, *, me: str, span: tuple[int, int], num_layers: int, model_hash: str,
          opener: str | None) -> Admitted:
    """Check a hello/open body addressed to this stage. ``opener`` is the authenticated peer that
    opened the stream (None only for local test harnesses that run a stage without a daemon:
    then ``me`` is empty too and identities are not checked). Raises :class:`AdmissionError`."""
    try:
        b = wire.check_session_body(body)
    except AdmissionError:
        raise
    except FrameError as e:
        raise AdmissionError(f"malformed session: {e}") from None
    route, i = b["route"], b["stage"]
    hop = route[i]
    if (hop["start"], hop["end"]) != tuple(span):
        raise AdmissionError(f"the route gives this stage layers {hop['start']}:{hop['end']}, it serves "
                             f"{span[0]}:{span[1]}")
    if b["num_layers"] != num_layers:
        raise AdmissionError(f"the head's model has {b['num_layers']} layers, this stage's {num_layers}")
    if model_hash and b["model_hash"] != model_hash:
        raise AdmissionError(f"model hash mismatch: head {str(b['model_hash'])[:12]}, stage {model_hash[:12]}")
    if me or opener is not None:
        peers = [h["peer"] for h in route]
        for j, peer in enumerate(peers):
            if not is_peer_id(peer):
                raise AdmissionError(f"route entry {j} names {str(peer)[:40]!r}, not a peer id")
            if hop_addr := route[j]["addr"]:
                if hop_addr != p2p_addr(peer):
                    raise AdmissionError(f"route entry {j} has address {hop_addr[:60]!r}: stages only reach "
                                         "peers by their peer id (p2p:<peer id>)")
        if len(set(peers)) != len(peers):
            raise AdmissionError("a peer appears twice in the route")
        if hop["peer"] != me:
            raise AdmissionError(f"route entry {i} is {hop['peer'][:16]}, not this peer ({me[:16]})")
        if route[i - 1]["peer"] != opener:
            raise AdmissionError(f"the session was opened by {str(opener)[:16]}, but the route names "
                                 f"{route[i - 1]['peer'][:16]} as the previous hop")
    return Admitted(head=route[0]["peer"], index=i, previous=route[i - 1]["peer"],
                    next=route[i + 1]["peer"] if i + 1 < len(route) else None, session=b["session"])


def next_hop_addr(body: dict, local_next: str | None) -> tuple[str, tuple[int, int]]:
    """Where this stage sends its hidden states: ``local_next`` (an operator's ``--next`` flag, for
    local harnesses) or ``p2p:<peer>`` of the next route entry; never an address from the body."""
    nxt = body["route"][body["stage"] + 1]
    span = (nxt["start"], nxt["end"])
    if local_next:
        return local_next, span
    if not is_peer_id(nxt["peer"]):
        raise AdmissionError(f"the next hop {str(nxt['peer'])[:40]!r} is not a peer id and no --next was given")
    return p2p_addr(nxt["peer"]), span


def same_session(first: Admitted, body: dict) -> None:
    """Later hello/open frames on one connection must continue the session it started with."""
    if body["session"] != first.session or body["route"][0]["peer"] != first.head:
        raise AdmissionError("a connection carries one session; open a new stream for another")

