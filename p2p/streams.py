"""Frames on async byte streams: libp2p streams, trio sockets, Unix sockets, in-memory pairs.

The stream object only needs ``await read(n) -> bytes`` (b"" or an exception at end of stream),
``await write(data)`` and ``await close()``. py-libp2p's ``read(n)`` may return fewer bytes than
asked (design.md section 6), so reading always loops on the decoder.

Each stream decodes within a :class:`molinkd.limits.MsgLimits` profile (``limits=``); payloads
over ``OFFLOAD_BYTES`` are checked and decoded in a worker thread, so one peer sending large or
adversarial frames cannot stall the trio loop (announcements, other peers' streams).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import trio

from molinkd.limits import MsgLimits
from p2p.framing import Frame, FrameDecoder, FrameError, decode_payload, encode_frame

READ_CHUNK = 1 << 20
# payloads above this are decoded off the trio loop (scanning 64 KiB of tiny values takes ~10 ms)
OFFLOAD_BYTES = 64 << 10
# at most this many large payloads are decoded at once per trio run (the machine has few cores)
DECODE_THREADS = 4
_DECODE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("molink_decode_limiter")


def _decode_limiter() -> trio.CapacityLimiter:
    try:
        return _DECODE_LIMITER.get()
    except LookupError:
        lim = trio.CapacityLimiter(DECODE_THREADS)
        _DECODE_LIMITER.set(lim)
        return lim


class ByteStream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...

    async def write(self, data: bytes) -> Any: ...

    async def close(self) -> Any: ...


class StreamClosed(ConnectionError):
    """The other side closed or reset the stream (or died) between frames."""


class FramedStream:
    """Send and receive :class:`Frame` objects over a byte stream, with deadlines.

    ``recv`` raises :class:`StreamClosed` at a clean end between frames, :class:`FrameError` on a
    malformed frame or an end in the middle of one, and ``trio.TooSlowError`` past its deadline.
    Sends are serialised by a lock so several tasks may share one stream.
    """

    def __init__(self, raw: Any, *, max_frame: int | None = None, peer: str = "?",
                 limits: MsgLimits | None = None) -> None:
        self.raw = raw
        self.peer = peer
        self._decoder = FrameDecoder(max_frame, limits=limits)
        self.max_frame = self._decoder.max_size
        self._send_lock = trio.Lock()
        self.bytes_in = 0
        self.bytes_out = 0

    async def send(self, msg_type: str, body: Any = None) -> None:
        data = encode_frame(msg_type, body, max_size=self.max_frame)
        await self.send_raw(data)

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await _write(self.raw, data)
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise StreamClosed(f"stream to {self.peer} closed while sending: {e}") from e
            except Exception as e:
                if _is_eof(e):  # py-libp2p's StreamClosed / StreamReset types
                    raise StreamClosed(f"stream to {self.peer} closed while sending: {e}") from e
                raise
            self.bytes_out += len(data)

    async def recv(self, timeout: float | None = None) -> Frame:
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        with trio.fail_at(deadline):
            while True:
                payload = self._decoder.next_payload()
                if payload is not None:
                    limits = self._decoder.limits
                    if len(payload) <= OFFLOAD_BYTES:
                        return decode_payload(payload, limits)
                    return await trio.to_thread.run_sync(
                        decode_payload, payload, limits, limiter=_decode_limiter(), abandon_on_cancel=True
                    )
                try:
                    data = await _read(self.raw, max(self._decoder.wanted(), READ_CHUNK))
                except (EOFError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    data = b""
                    cause: BaseException | None = e
                except Exception as e:  # py-libp2p raises its own StreamEOF / StreamReset types
                    if _is_eof(e):
                        data = b""
                        cause = e
                    else:
                        raise
                else:
                    cause = None
                if not data:
                    if self._decoder.at_boundary():
                        raise StreamClosed(f"stream from {self.peer} ended") from cause
                    raise FrameError(
                        f"stream from {self.peer} ended inside a frame ({self._decoder.buffered} bytes buffered)"
                    ) from cause
                self.bytes_in += len(data)
                self._decoder.feed(data)

    @property
    def limits(self) -> MsgLimits:
        return self._decoder.limits

    @limits.setter
    def limits(self, value: MsgLimits) -> None:
        """Change the decoding profile between frames (e.g. tighten once a session is agreed)."""
        self._decoder.limits = value
        self._decoder.max_size = self.max_frame = value.max_frame

    def take_unparsed(self) -> bytes:
        """Bytes already read from the stream but not yet parsed into frames (see FrameDecoder)."""
        return self._decoder.take_unparsed()

    async def close(self) -> None:
        try:
            await self.raw.close()
        except Exception:
            pass


def _is_eof(e: BaseException) -> bool:
    name = type(e).__name__
    return name in {"StreamEOF", "StreamReset", "StreamClosed", "MuxedStreamEOF", "MuxedStreamReset"} or (
        "EOF" in name or "Reset" in name or "Closed" in name
    )


async def _read(raw: Any, n: int) -> bytes:
    if hasattr(raw, "read"):
        return await raw.read(n)
    return await raw.receive_some(n)  # trio.abc.ReceiveStream


async def _write(raw: Any, data: bytes) -> None:
    if hasattr(raw, "write"):
        await raw.write(data)
    else:
        await raw.send_all(data)  # trio.abc.SendStream


__all__ = ["ByteStream", "FramedStream", "StreamClosed", "FrameError", "Frame"]
