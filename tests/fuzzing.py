"""PURE fuzzing helpers: mutated variants of valid messages, reproducible from a seed.

Used by tests/unit/test_fuzz.py (every decoder) and by the live-stage fuzz (mutated ``eng.step``
bodies thrown at a running stage). No I/O, no vLLM import.

- :func:`mutate` returns a deep copy of a msgpack-able value with one structural change at a random
  place (a value replaced by a hostile one, a key dropped or added, a list cut, grown or reordered,
  a container swapped for a scalar, ...).
- :func:`mutate_step_bodies` yields ``n`` such variants of an ``eng.step`` body (each with 1-3
  mutations), concentrated on the scheduler output (where the checks live).
- :func:`mutate_bytes` damages encoded bytes: bit flips, truncation, insertion, and length fields
  that lie (the frame header and msgpack length prefixes).
"""

from __future__ import annotations

import copy
import random
import struct
from collections.abc import Iterator
from typing import Any

# values chosen to hit edges: signs, 32/64-bit bounds, non-finite floats, empties, wrong types
HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, 1, -1, 2, 7, 255, 256, 65535, 65536, 49152, 2**31 - 1, 2**31, -(2**31), 2**32,
    2**53, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 0.5, 1e308, -1e308, float("inf"), float("-inf"),
    float("nan"), "", "x", "hidden_states", "residual", "bfloat16", "int64", "object", "\x00", "é" * 40,
    b"", b"\x00", b"\xff" * 7, [], [[]], [0], [-1], [2**40], {}, {"": None}, {"dtype": "float32", "shape": [2],
    "data": b"\x00" * 8}, {"dtype": "bfloat16", "shape": [1 << 20, 1 << 20], "data": b""},
)


def _paths(obj: Any, path: tuple = (), out: list | None = None, limit: int = 4096) -> list[tuple]:
    """Every container path in ``obj`` (iterative would be faster; messages are small)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    out.append(path)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                _paths(v, (*path, k), out, limit)
            else:
                out.append((*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, (dict, list)):
                _paths(v, (*path, i), out, limit)
            else:
                out.append((*path, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def hostile_value(rng: random.Random) -> Any:
    v = rng.choice(HOSTILE)
    r = rng.random()
    if r < 0.1:
        return [copy.deepcopy(v)] * rng.choice((2, 17, 300))
    if r < 0.15:
        return {str(rng.randrange(100)): copy.deepcopy(v)}
    return copy.deepcopy(v)


def mutate(obj: Any, rng: random.Random, *, prefer: tuple = ()) -> Any:
    """A deep copy of ``obj`` with one random structural change (under ``prefer`` when it exists
    and with probability 0.8)."""
    obj = copy.deepcopy(obj)
    root: Any = {"_": obj}
    paths = [p for p in _paths(obj) if p]
    if prefer and rng.random() < 0.8:
        pref = [p for p in paths if p[: len(prefer)] == prefer]
        paths = pref or paths
    if not paths:
        return hostile_value(rng)
    path = rng.choice(paths)
    parent = _get(root["_"], path[:-1])
    key = path[-1]
    cur = parent[key]
    op = rng.randrange(10)
    if op <= 3:  # replace with a hostile value
        parent[key] = hostile_value(rng)
    elif op == 4 and isinstance(parent, dict):  # drop the key
        del parent[key]
    elif op == 4 and isinstance(parent, list):
        del parent[key]
    elif op == 5 and isinstance(cur, list):  # cut or grow a list
        if cur and rng.random() < 0.5:
            del cur[rng.randrange(len(cur)):]
        else:
            cur.extend(copy.deepcopy(cur[:1]) * rng.choice((1, 2, 50)) if cur else [hostile_value(rng)])
    elif op == 6 and isinstance(cur, list) and len(cur) > 1:  # reorder
        rng.shuffle(cur)
    elif op == 6 and isinstance(cur, dict):  # add a key
        cur[rng.choice(("extra", "", "0", "x" * 300, "hidden_states"))] = hostile_value(rng)
    elif op == 7 and isinstance(cur, int) and not isinstance(cur, bool):  # near-miss numbers
        parent[key] = cur + rng.choice((-1, 1, -(cur + 1), 1 << 20, 1 << 40))
    elif op == 8:  # wrap or unwrap
        parent[key] = [cur] if not isinstance(cur, list) or not cur else cur[0]
    else:  # swap a container for a scalar or vice versa
        parent[key] = hostile_value(rng) if isinstance(cur, (dict, list)) else [cur, cur]
    return root["_"]


def mutate_step_bodies(body: dict, n: int, seed: int) -> Iterator[dict]:
    """``n`` mutated variants of a valid ``eng.step`` body (1-3 mutations each, mostly inside
    ``sched``), reproducible from ``seed``."""
    rng = random.Random(seed)
    for _ in range(n):
        b = body
        for _ in range(rng.choice((1, 1, 2, 3))):
            b = mutate(b, rng, prefer=("sched",))
        yield b


_HEADER = struct.Struct(">I")


def mutate_frames(frame: bytes, n: int, seed: int) -> Iterator[bytes]:
    """``n`` damaged copies of one encoded frame (header included), reproducible from ``seed``."""
    rng = random.Random(seed)
    for _ in range(n):
        yield mutate_bytes(frame, rng, framed=True)


def mutate_bytes(data: bytes, rng: random.Random, *, framed: bool = False) -> bytes:
    """Damaged ``data``: bit flips, truncation, insertion, duplication, or (``framed``: data starts
    with a 4-byte length header) a header or msgpack length field that lies."""
    b = bytearray(data)
    op = rng.randrange(7)
    if not b:
        return bytes([rng.randrange(256)])
    if op == 0:
        for _ in range(rng.choice((1, 1, 2, 8))):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        del b[rng.randrange(len(b)):]
    elif op == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 5))))
    elif op == 3:
        i = rng.randrange(len(b))
        b[i] = rng.choice((0xC1, 0xD4, 0xD6, 0xD7, 0xC7, 0xDC, 0xDD, 0xDE, 0xDF, 0xC6, 0xDB, 0xFF, 0x00))
    elif op == 4 and framed and len(b) >= 4:
        b[:4] = _HEADER.pack(rng.choice((0, 1, len(b) - 5, len(b) + 1, 1 << 31, 0xFFFFFFFF)) % (1 << 32))
    elif op == 5:  # a msgpack length prefix that lies: find one and inflate it
        prefixes = [i for i, x in enumerate(b) if x in (0xDC, 0xDD, 0xDE, 0xDF, 0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB)]
        if prefixes:
            i = rng.choice(prefixes)
            width = {0xC4: 1, 0xD9: 1, 0xC5: 2, 0xDA: 2, 0xDC: 2, 0xDE: 2}.get(b[i], 4)
            b[i + 1:i + 1 + width] = (0xFF,) * min(width, len(b) - i - 1)
        else:
            b[rng.randrange(len(b))] = 0xDD
    else:
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        b[i:i] = b[i:j]
    return bytes(b)


__all__ = ["HOSTILE", "hostile_value", "mutate", "mutate_bytes", "mutate_frames", "mutate_step_bodies"]
