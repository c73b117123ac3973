"""Frames exchanged between the head's executor and the stage workers (engine data plane).

Transport-agnostic: bodies are plain msgpack values framed by :mod:`p2p.framing`; the bytes may
travel over loopback TCP, a Unix socket or (later) a libp2p stream bridged by the daemon.

Topology: a chain. The head dials stage 1, stage i dials stage i+1. Requests travel forward
(head -> 1 -> 2 -> ... -> last); replies travel back along the same connections (last -> ... -> 1
-> head), each stage relaying them unchanged. Why back along the chain rather than a direct
last->head connection: only the forward dials the route planner validated are needed (the last
stage may not be able to dial the head behind a NAT), the head has one connection to watch
(any hop dying closes it), and replies are ~100 bytes per step so the extra hops cost only
latency, which for the 2-stage case is identical.

Frame types (``t``) and bodies (``b``):

``eng.hello``  head -> chain. Session probe. Body: :func:`session_body` with ``num_blocks = 0``
               and ``stages = []``; each stage checks the body against itself, appends
               ``{"index", "start", "end", "max_blocks", "peer"}`` and forwards; the last stage
               replies ``eng.hello_ok``.
``eng.hello_ok`` last -> head. ``{"session", "stages": [...]}``: every stage's capacity.
``eng.open``   head -> chain. Same body, ``num_blocks`` = the minimum over all stages (the
               head's included): every stage allocates exactly that many KV blocks.
``eng.open_ok`` last -> head. ``{"session", "num_blocks"}``.
``eng.step``   head -> chain. ``{"step", "sched", "grammar", "hidden", "sample"}``: ``sched``
               is the encoded SchedulerOutput (a delta), ``hidden`` a ``{name: tensor}`` map
               (hidden_states + residual of the previous stage, None for an empty step),
               ``sample`` False for steps with no tokens scheduled (no reply then).
``eng.result`` last -> head. ``{"step", "output"}``: an encoded ModelRunnerOutput.
``eng.error``  any stage -> head. ``{"step", "stage", "message"}``; the session is dead.
``eng.ping``   head -> chain ``{"nonce"}``; the last stage answers ``eng.pong {"nonce"}``.
``eng.close``  head -> chain ``{"session"}``: end of session, forwarded, connections closed.
"""

from __future__ import annotations

from typing import Any

from p2p.framing import FrameError, require

HELLO = "eng.hello"
HELLO_OK = "eng.hello_ok"
OPEN = "eng.open"
OPEN_OK = "eng.open_ok"
STEP = "eng.step"
RESULT = "eng.result"
ERROR = "eng.error"
PING = "eng.ping"
PONG = "eng.pong"
CLOSE = "eng.close"

FORWARD_TYPES = frozenset({HELLO, OPEN, STEP, PING, CLOSE})
REPLY_TYPES = frozenset({HELLO_OK, OPEN_OK, RESULT, ERROR, PONG})


def session_body(
    *,
    session: str,
    model_hash: str,
    route: list[dict],
    num_layers: int,
    dtype: str,
    max_model_len: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    block_size: int,
    num_blocks: int = 0,
    stage: int = 1,
) -> dict:
    """The handshake body. ``route`` is ``[{"peer", "addr", "start", "end"}]``, head first;
    ``stage`` is the index (in ``route``) of the stage the frame is addressed to."""
    return {
        "session": session,
        "model_hash": model_hash,
        "route": route,
        "num_layers": num_layers,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "stage": stage,
        "stages": [],
    }


def check_session_body(b: Any) -> dict:
    """Validate a hello/open body (raises FrameError naming the bad field)."""
    for key, kind in (
        ("session", str),
        ("model_hash", str),
        ("route", list),
        ("num_layers", int),
        ("dtype", str),
        ("max_model_len", int),
        ("max_num_seqs", int),
        ("max_num_batched_tokens", int),
        ("block_size", int),
        ("num_blocks", int),
        ("stage", int),
        ("stages", list),
    ):
        require(b, key, kind)
    route = b["route"]
    if not 2 <= len(route) <= 64:
        raise FrameError(f"route must have 2..64 stages, got {len(route)}")
    pos = 0
    for i, hop in enumerate(route):
        start, end = require(hop, "start", int), require(hop, "end", int)
        require(hop, "peer", str)
        require(hop, "addr", str)
        if start != pos or end <= start:
            raise FrameError(f"route stage {i} span {start}:{end} does not continue at layer {pos}")
        pos = end
    if pos != b["num_layers"]:
        raise FrameError(f"route ends at layer {pos}, the model has {b['num_layers']}")
    if not 1 <= b["stage"] < len(route):
        raise FrameError(f"stage index {b['stage']} outside 1..{len(route) - 1}")
    return b


def check_step_body(b: Any) -> dict:
    require(b, "step", int)
    require(b, "sched", dict)
    require(b, "sample", bool)
    if b.get("hidden") is not None and not isinstance(b["hidden"], dict):
        raise FrameError("field 'hidden' must be a map of tensors or None")
    t = b.get("timings")
    if t is not None and (not isinstance(t, list) or len(t) > 64):
        raise FrameError("field 'timings' must be a list of at most 64 [peer, ms] pairs")
    if b.get("grammar") is not None and not isinstance(b["grammar"], dict):
        raise FrameError("field 'grammar' must be a map or None")
    return b
