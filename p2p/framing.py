"""Sans-IO wire framing: length-prefixed msgpack frames with a schema version and a message type.

A frame on the wire is ``u32 big-endian length`` followed by that many bytes of msgpack encoding
a map ``{"v": VERSION, "t": type, "b": body}``. Bodies are plain msgpack values (maps, lists,
str, int, float, bool, None, bytes). Tensors travel as ``{"dtype", "shape", "data"}`` maps with the
raw buffer in a msgpack ``bin`` (see :mod:`p2p.tensors`); nothing is ever unpickled.

This module does no I/O: :class:`FrameDecoder` takes bytes in and gives frames out, and
:func:`encode_frame` gives bytes. :mod:`p2p.streams` puts it on real streams.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack

VERSION = 1
HEADER = struct.Struct(">I")
# Frames carry hidden states of a micro-batch: 16 MiB holds ~7000 tokens of a 576-wide bf16 model;
# bigger models/batches raise it per stream (MAX_FRAME_HARD is the absolute ceiling).
DEFAULT_MAX_FRAME = 64 << 20
MAX_FRAME_HARD = 1 << 30


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


def decode_payload(payload: bytes | memoryview) -> Frame:
    """Decode one frame payload (without its length header), validating the envelope."""
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            # msgpack's ext types are refused: only plain data crosses the wire
            ext_hook=_refuse_ext,
        )
    except FrameError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"undecodable msgpack payload ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "t" not in obj or "v" not in obj:
        raise FrameError("frame is not a {v, t, b} map")
    version, msg_type = obj["v"], obj["t"]
    if not isinstance(version, int) or not isinstance(msg_type, str):
        raise FrameError("frame version must be an int and type a string")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this peer speaks {VERSION}); upgrade the older peer")
    return Frame(type=msg_type, body=obj.get("b"), version=version)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not allowed on the wire")


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` then ``next_frame()`` until it returns None.

    A length over ``max_size`` raises FrameError immediately (before buffering the body), so a
    peer cannot make us allocate an arbitrary amount of memory.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        if not 0 < max_size <= MAX_FRAME_HARD:
            raise ValueError(f"max_size must be in (0, {MAX_FRAME_HARD}]")
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
        return decode_payload(payload)

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
