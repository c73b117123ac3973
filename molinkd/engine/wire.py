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

import math
from typing import Any

from molinkd.limits import MAX_ROUTE_LEN
from p2p.framing import FrameError, require

MAX_ID_LEN = 256  # session ids, peer ids, model hashes
MAX_ADDR_LEN = 512
MAX_BLOCKS = 1 << 31
DTYPES = frozenset({"bfloat16", "float16", "float32"})

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


def _short_str(b: Any, key: str, limit: int = MAX_ID_LEN) -> str:
    v = require(b, key, str)
    if len(v) > limit:
        raise FrameError(f"field {key!r} is longer than {limit} characters")
    return v


def _pos_int(b: Any, key: str, lo: int = 1, hi: int = 1 << 31) -> int:
    v = require(b, key, int)
    if not lo <= v <= hi:
        raise FrameError(f"field {key!r} is {v}, outside [{lo}, {hi}]")
    return v


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
    _short_str(b, "session")
    _short_str(b, "model_hash")
    if b["dtype"] not in DTYPES:
        raise FrameError(f"dtype {b['dtype'][:32]!r} is not one of {sorted(DTYPES)}")
    _pos_int(b, "num_layers", 1, 1 << 20)
    _pos_int(b, "max_model_len", 1, 1 << 24)
    _pos_int(b, "max_num_seqs", 1, 1 << 16)
    _pos_int(b, "max_num_batched_tokens", 1, 1 << 24)
    _pos_int(b, "block_size", 0, 1 << 16)
    _pos_int(b, "num_blocks", 0, MAX_BLOCKS)
    route = b["route"]
    if not 2 <= len(route) <= MAX_ROUTE_LEN:
        raise FrameError(f"route must have 2..{MAX_ROUTE_LEN} stages, got {len(route)}")
    pos = 0
    for i, hop in enumerate(route):
        start, end = require(hop, "start", int), require(hop, "end", int)
        _short_str(hop, "peer")
        _short_str(hop, "addr", MAX_ADDR_LEN)
        if start != pos or end <= start:
            raise FrameError(f"route stage {i} span {start}:{end} does not continue at layer {pos}")
        pos = end
    if pos != b["num_layers"]:
        raise FrameError(f"route ends at layer {pos}, the model has {b['num_layers']}")
    if not 1 <= b["stage"] < len(route):
        raise FrameError(f"stage index {b['stage']} outside 1..{len(route) - 1}")
    if len(b["stages"]) >= b["stage"]:
        raise FrameError(f"{len(b['stages'])} stage descriptions before stage {b['stage']}")
    for i, st in enumerate(b["stages"]):
        _check_stage_entry(st, i + 1, route, peers=False)
    return b


def check_step_body(b: Any, max_timings: int = MAX_ROUTE_LEN) -> dict:
    """Validate an ``eng.step`` body's envelope; ``max_timings`` is the route's length (one
    ``[peer, ms]`` pair per stage at most)."""
    require(b, "step", int)
    require(b, "sched", dict)
    require(b, "sample", bool)
    if b.get("hidden") is not None and not isinstance(b["hidden"], dict):
        raise FrameError("field 'hidden' must be a map of tensors or None")
    check_timings(b.get("timings"), max_timings)
    if b.get("grammar") is not None and not isinstance(b["grammar"], dict):
        raise FrameError("field 'grammar' must be a map or None")
    return b


def check_timings(t: Any, max_timings: int = MAX_ROUTE_LEN) -> None:
    """None, or a list of at most ``max_timings`` ``[peer id, milliseconds]`` pairs."""
    if t is None:
        return
    if not isinstance(t, list) or len(t) > max_timings:
        raise FrameError(f"field 'timings' must be a list of at most {max_timings} [peer, ms] pairs")
    for item in t:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or len(item[0]) > MAX_ID_LEN
            or isinstance(item[1], bool)
            or not isinstance(item[1], (int, float))
            or not (math.isfinite(item[1]) and 0 <= item[1] < 1e9)
        ):
            raise FrameError("field 'timings' must hold [peer id, milliseconds >= 0] pairs")


def _check_stage_entry(st: Any, index: int, route: list[dict], *, peers: bool) -> dict:
    where = f"stages[{index - 1}]"
    if not isinstance(st, dict):
        raise FrameError(f"{where} must be a map")
    try:
        got = require(st, "index", int)
        start, end = require(st, "start", int), require(st, "end", int)
        _pos_int(st, "max_blocks", 1, MAX_BLOCKS)
        peer = _short_str(st, "peer")
    except FrameError as e:
        raise FrameError(f"{where}: {e}") from None
    if got != index:
        raise FrameError(f"{where} says it is stage {got}, its position makes it stage {index}")
    hop = route[index]
    if (start, end) != (hop["start"], hop["end"]):
        raise FrameError(f"{where} serves {start}:{end}, the route gives stage {index} {hop['start']}:{hop['end']}")
    if peers and peer != hop["peer"]:
        raise FrameError(f"{where} is peer {peer[:64]!r}, the route names {hop['peer'][:64]!r} for stage {index}")
    return st


def check_hello_ok(b: Any, route: list[dict], *, session: str | None = None, peers: bool = True) -> dict:
    """Validate the last stage's ``eng.hello_ok`` on the head: one entry per remote stage, in route
    order, each with its index (= its position + 1), the route's span, ``max_blocks`` >= 1 and (with
    ``peers``) the peer id the route names. Raises FrameError naming the entry."""
    if not isinstance(b, dict):
        raise FrameError("hello_ok body must be a map")
    sid = _short_str(b, "session")
    if session is not None and sid != session:
        raise FrameError(f"hello_ok is for session {sid[:16]!r}, not ours")
    stages = require(b, "stages", list)
    if len(stages) != len(route) - 1:
        raise FrameError(f"hello_ok describes {len(stages)} stages, the route has {len(route) - 1} after the head")
    for i, st in enumerate(stages):
        _check_stage_entry(st, i + 1, route, peers=peers)
    return b


def check_open_ok(b: Any, *, session: str | None = None, num_blocks: int | None = None) -> dict:
    """Validate ``eng.open_ok``: ``{"session": str, "num_blocks": int >= 1}`` (equal to what was
    asked when ``num_blocks`` is given)."""
    if not isinstance(b, dict):
        raise FrameError("open_ok body must be a map")
    sid = _short_str(b, "session")
    if session is not None and sid != session:
        raise FrameError(f"open_ok is for session {sid[:16]!r}, not ours")
    n = _pos_int(b, "num_blocks", 1, MAX_BLOCKS)
    if num_blocks is not None and n != num_blocks:
        raise FrameError(f"open_ok reports {n} KV blocks, {num_blocks} were asked")
    return b
