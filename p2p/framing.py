"""Sans-IO wire framing: length-prefixed msgpack frames with a schema version and a message type.

A frame on the wire is ``u32 big-endian length`` followed by that many bytes of msgpack encoding
a map ``{"v": VERSION, "t": type, "b": body}``. Bodies are plain msgpack values (maps, lists,
str, int, float, bool, None, bytes). Tensors travel as ``{"dtype", "shape", "data"}`` maps with the
raw buffer in a msgpack ``bin`` (see :mod:`p2p.tensors`); nothing is ever unpickled.

Every payload is checked against a :class:`molinkd.limits.MsgLimits` profile by :func:`scan`
*before* msgpack builds any object: lengths of bins/strings/arrays/maps, nesting depth, the total
number of values, and the estimated size of the decoded objects (at most ``max_expansion`` times
the payload plus a small slack, so a frame of a million empty maps is refused instead of costing
a hundred times its size). Every msgpack extension type is refused, the timestamp (-1) included
(msgpack decodes it natively without calling ``ext_hook``).

This module does no I/O: :class:`FrameDecoder` takes bytes in and gives frames out, and
:func:`encode_frame` gives bytes. :mod:`p2p.streams` puts it on real streams.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack

from molinkd.limits import EXPANSION_SLACK, STAGE_MSG, MsgLimits

VERSION = 1
HEADER = struct.Struct(">I")
# Frames carry hidden states of a micro-batch: 16 MiB holds ~7000 tokens of a 576-wide bf16 model;
# bigger models/batches raise it per stream (MAX_FRAME_HARD is the absolute ceiling).
DEFAULT_MAX_FRAME = STAGE_MSG.max_frame
MAX_FRAME_HARD = 1 << 30
DEFAULT_LIMITS = STAGE_MSG  # the most permissive profile: pass a tighter one per protocol


class FrameError(ValueError):
    """The remote side sent something that is not a valid frame (remote misbehaviour)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    type: str
    body: Any
    version: int = VERSION

    def get(self, key: str, default: Any = None) -> Any:
        if isinstance(self.body, dict):
            return self.body.get(key, default)
        return default


def encode_frame(msg_type: str, body: Any = None, *, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode one frame (header included). Raises FrameError if it would exceed ``max_size``."""
    payload = msgpack.packb({"v": VERSION, "t": msg_type, "b": body}, use_bin_type=True)
    if len(payload) > max_size:
        raise FrameError(f"frame {msg_type!r} is {len(payload)} bytes, over the {max_size}-byte limit")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes | bytearray | memoryview, limits: MsgLimits = DEFAULT_LIMITS) -> Frame:
    """Decode one frame payload (without its length header), validating the envelope.

    Raises FrameError (never anything else) on bad input: over ``limits``, malformed msgpack, an
    extension type, or an envelope that is not ``{v, t, b}``."""
    obj = unpack(payload, limits)
    if not isinstance(obj, dict) or "t" not in obj or "v" not in obj:
        raise FrameError("frame is not a {v, t, b} map")
    version, msg_type = obj["v"], obj["t"]
    if isinstance(version, bool) or not isinstance(version, int) or not isinstance(msg_type, str):
        raise FrameError("frame version must be an int and type a string")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this peer speaks {VERSION}); upgrade the older peer")
    return Frame(type=msg_type, body=obj.get("b"), version=version)


def unpack(data: bytes | bytearray | memoryview, limits: MsgLimits, error: type[ValueError] | None = None) -> Any:
    """msgpack bytes -> plain values within ``limits`` (:func:`scan` first, then msgpack with the
    same bounds). Raises ``error`` (FrameError by default) and nothing else on bad input."""
    err = error or FrameError
    data = bytes(data)
    scan(data, limits, err)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,  # also refuses the timestamp ext (-1), which never reaches ext_hook
            ext_hook=_refuse_ext,
        )
    except FrameError as e:
        raise err(str(e)) from None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise err(f"undecodable msgpack payload ({type(e).__name__}: {e})") from None


_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")
# estimated bytes of decoded Python objects (64-bit CPython), used to bound expansion
_W_PTR, _W_INT, _W_FLOAT, _W_STR, _W_BIN, _W_LIST, _W_DICT, _W_ITEM = 8, 36, 32, 57, 41, 64, 72, 48


def scan(data: bytes, limits: MsgLimits, error: type[ValueError] = FrameError) -> int:
    """Walk one msgpack value in ``data`` without building it; return the number of values.

    Raises ``error`` if any length, the depth, the value count or the estimated decoded size
    exceeds ``limits``, on any extension type, on a reserved byte, on truncation or trailing
    bytes. Cost: O(number of values); strings and bins are skipped, not read."""
    n = len(data)
    if n > limits.max_frame:
        raise error(f"{limits.name} message of {n} bytes exceeds the {limits.max_frame}-byte limit")
    max_depth, max_elems = limits.max_depth, limits.max_elements
    max_str, max_bin, max_arr, max_map = limits.max_str_len, limits.max_bin_len, limits.max_array_len, limits.max_map_len
    pos = 0
    left = 1  # values still to read in the innermost open container (the top level counts as one)
    stack: list[int] = []
    count = 0
    cost = 0
    budget = limits.max_expansion * n + EXPANSION_SLACK
    u16, u32 = _U16.unpack_from, _U32.unpack_from
    try:
        while True:
            if left == 0:
                if not stack:
                    break
                left = stack.pop()
                continue
            left -= 1
            b = data[pos]
            pos += 1
            count += 1
            if b <= 0x7F or b >= 0xE0:  # fixint
                cost += _W_PTR
                continue
            if b >= 0xA0 and b <= 0xBF:  # fixstr
                ln = b & 0x1F
                if ln > max_str:
                    raise error(f"string of {ln} bytes over the {max_str}-byte limit")
                pos += ln
                cost += _W_STR + ln
                continue
            if b == 0xCD or b == 0xD1:  # uint16/int16 (token ids)
                pos += 2
                cost += _W_INT
                continue
            if b <= 0x9F:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
                if b <= 0x8F:
                    k = b & 0x0F
                    if k > max_map:
                        raise error(f"map of {k} entries over the {max_map}-entry limit")
                    items = 2 * k
                    cost += _W_DICT + _W_ITEM * k
                else:
                    items = b & 0x0F
                    if items > max_arr:
                        raise error(f"array of {items} items over the {max_arr}-item limit")
                    cost += _W_LIST + _W_PTR * items
            elif b == 0xC0 or b == 0xC2 or b == 0xC3:
                cost += _W_PTR
                continue
            elif b == 0xCC or b == 0xD0:
                pos += 1
                cost += _W_INT
                continue
            elif b == 0xCE or b == 0xD2 or b == 0xCA:
                pos += 4
                cost += _W_INT
                continue
            elif b == 0xCF or b == 0xD3 or b == 0xCB:
                pos += 8
                cost += _W_INT
                continue
            elif b == 0xD9 or b == 0xDA or b == 0xDB:  # str8/16/32
                if b == 0xD9:
                    ln = data[pos]
                    pos += 1
                elif b == 0xDA:
                    (ln,) = u16(data, pos)
                    pos += 2
                else:
                    (ln,) = u32(data, pos)
                    pos += 4
                if ln > max_str:
                    raise error(f"string of {ln} bytes over the {max_str}-byte limit")
                pos += ln
                cost += _W_STR + ln
                continue
            elif b == 0xC4 or b == 0xC5 or b == 0xC6:  # bin8/16/32
                if b == 0xC4:
                    ln = data[pos]
                    pos += 1
                elif b == 0xC5:
                    (ln,) = u16(data, pos)
                    pos += 2
                else:
                    (ln,) = u32(data, pos)
                    pos += 4
                if ln > max_bin:
                    raise error(f"binary of {ln} bytes over the {max_bin}-byte limit")
                pos += ln
                cost += _W_BIN + ln
                continue
            elif b == 0xDC or b == 0xDD:  # array16/32
                if b == 0xDC:
                    (items,) = u16(data, pos)
                    pos += 2
                else:
                    (items,) = u32(data, pos)
                    pos += 4
                if items > max_arr:
                    raise error(f"array of {items} items over the {max_arr}-item limit")
                cost += _W_LIST + _W_PTR * items
            elif b == 0xDE or b == 0xDF:  # map16/32
                if b == 0xDE:
                    (k,) = u16(data, pos)
                    pos += 2
                else:
                    (k,) = u32(data, pos)
                    pos += 4
                if k > max_map:
                    raise error(f"map of {k} entries over the {max_map}-entry limit")
                items = 2 * k
                cost += _W_DICT + _W_ITEM * k
            elif b == 0xC1:
                raise error("reserved msgpack byte 0xc1")
            else:  # 0xc7-0xc9 ext8/16/32, 0xd4-0xd8 fixext: timestamp (-1) included
                at = pos + {0xC7: 1, 0xC8: 2, 0xC9: 4}.get(b, 0)
                code = "?" if at >= n else (data[at] - 256 if data[at] >= 128 else data[at])
                raise error(f"msgpack extension type {code} is not allowed on the wire")
            # a container with `items` values follows
            if count + items > max_elems:
                raise error(f"{limits.name} message has over {max_elems} values")
            if cost > budget:
                break  # refused below, before reading further
            if len(stack) >= max_depth:
                raise error(f"{limits.name} message nests deeper than {max_depth} levels")
            if items:
                stack.append(left)
                left = items
    except IndexError:
        raise error(f"truncated msgpack value ({n} bytes)") from None
    except struct.error:
        raise error(f"truncated msgpack value ({n} bytes)") from None
    if cost > budget:
        raise error(
            f"{limits.name} message of {n} bytes would decode to over {cost} bytes of objects "
            f"(limit {limits.max_expansion:g}x): refused as an amplification attempt"
        )
    if pos != n:
        if pos > n:
            raise error(f"truncated msgpack value ({n} bytes)")
        raise error(f"{n - pos} trailing bytes after the msgpack value")
    return count


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not allowed on the wire")


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` then ``next_frame()`` until it returns None.

    A length over ``max_size`` raises FrameError immediately (before buffering the body), so a
    peer cannot make us allocate an arbitrary amount of memory. Payloads are decoded within
    ``limits`` (default: the permissive stage profile); ``max_size`` defaults to
    ``limits.max_frame`` and may only narrow it. Both attributes may be changed between frames
    (e.g. tightened once a session's limits are agreed).
    """

    def __init__(self, max_size: int | None = None, *, limits: MsgLimits | None = None) -> None:
        self.limits = limits or DEFAULT_LIMITS
        if max_size is None:
            max_size = self.limits.max_frame
        if not 0 < max_size <= MAX_FRAME_HARD:
            raise ValueError(f"max_size must be in (0, {MAX_FRAME_HARD}]")
        if max_size > self.limits.max_frame:
            self.limits = self.limits.replace(max_frame=max_size)
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the header is read

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def wanted(self) -> int:
        """How many more bytes are needed to complete the next frame (header or payload)."""
        if self._need is None:
            return max(HEADER.size - len(self._buf), 0) or 1
        return max(self._need - len(self._buf), 0) or 1

    def next_frame(self) -> Frame | None:
        payload = self.next_payload()
        return None if payload is None else decode_payload(payload, self.limits)

    def next_payload(self) -> bytes | None:
        """The next complete payload, undecoded (decode it with ``decode_payload(p, self.limits)``,
        e.g. in a worker thread when it is large)."""
        if self._need is None:
            if len(self._buf) < HEADER.size:
                return None
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_size:
                raise FrameError(f"announced frame of {n} bytes exceeds the {self.max_size}-byte limit")
            if n == 0:
                raise FrameError("empty frame")
            del self._buf[: HEADER.size]
            self._need = n
        if len(self._buf) < self._need:
            return None
        payload = bytes(self._buf[: self._need])
        del self._buf[: self._need]
        self._need = None
        return payload

    def take_unparsed(self) -> bytes:
        """Remove and return every byte fed but not yet returned as a frame, exactly as received
        (used when a stream switches from frames to a raw byte pipe)."""
        out = bytes(self._buf)
        if self._need is not None:
            out = HEADER.pack(self._need) + out
        self._buf.clear()
        self._need = None
        return out

    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (a clean place for the stream to end)."""
        return self._need is None and not self._buf


def require(body: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch ``body[key]`` and check its type, raising FrameError naming the field."""
    if not isinstance(body, dict):
        raise FrameError("frame body must be a map")
    if key not in body:
        raise FrameError(f"missing field {key!r}")
    value = body[key]
    if kind is int and isinstance(value, bool):
        raise FrameError(f"field {key!r} must be int, got bool")
    if not isinstance(value, kind):
        raise FrameError(f"field {key!r} has type {type(value).__name__}, expected {kind}")
    return value
