"""A user-space WAN link: a TCP forwarder that delays (and optionally rate-limits) every byte.

This kernel has no netem, so delay cannot come from ``tc``. ``WanLink`` listens on a loopback
port and forwards each accepted connection to a target address; every chunk read in either
direction is delivered ``delay`` seconds later (one-way delay, so an RTT of R ms is
``delay = R / 2000``), after it has been serialised at ``rate`` bits/s when a rate is given.
Reading never waits for delivery (the bytes in flight are the bandwidth-delay product), up to a
bound on buffered bytes per direction, past which the reader stops (TCP back-pressure).

The delay and the rate can be changed while connections are open (``set``): a benchmark measures
the same swarm without and with delay. Delivery order is always kept.

The timing model (:class:`LinkModel`) is pure and unit-tested; the forwarder is its I/O edge.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field

import trio

log = logging.getLogger("molinkd.bench.wanlink")

CHUNK = 1 << 16
MAX_BUFFERED = 16 << 20  # bytes queued per direction before the reader waits


@dataclass
class LinkModel:
    """When a chunk read at ``now`` reaches the far end: serialisation at ``rate_bps`` (None:
    unlimited) behind the chunks already on the wire, then ``delay`` seconds of propagation.
    Delivery times never go backwards, even when ``delay`` shrinks between two chunks."""

    delay: float = 0.0
    rate_bps: float | None = None
    _wire_free: float = field(default=0.0, repr=False)  # when the transmitter is idle again
    _last_delivery: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self.set(self.delay, self.rate_bps)

    def set(self, delay: float, rate_bps: float | None) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 s, got {delay}")
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate must be > 0 bit/s (or None for unlimited), got {rate_bps}")
        self.delay, self.rate_bps = delay, rate_bps

    def deliver_at(self, nbytes: int, now: float) -> float:
        start = max(now, self._wire_free)
        sent = start + (nbytes * 8 / self.rate_bps if self.rate_bps else 0.0)
        self._wire_free = sent
        at = max(sent + self.delay, self._last_delivery)
        self._last_delivery = at
        return at


class _Direction:
    """One direction of one connection: a FIFO of (deliver_at, bytes)."""

    def __init__(self, model: LinkModel) -> None:
        self.model = model
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.changed = trio.Event()
        self.bytes = 0

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def read_side(self, src: trio.abc.Stream) -> None:
        while True:
            while self.buffered > MAX_BUFFERED:
                await self.changed.wait()
            data = await src.receive_some(CHUNK)
            if not data:
                self.eof = True
                self._wake()
                return
            self.queue.append((self.model.deliver_at(len(data), trio.current_time()), data))
            self.buffered += len(data)
            self.bytes += len(data)
            self._wake()

    async def write_side(self, dst: trio.abc.Stream) -> None:
        while True:
            if not self.queue:
                if self.eof:
                    with contextlib.suppress(Exception):
                        if isinstance(dst, trio.SocketStream):
                            await dst.send_eof()
                    return
                await self.changed.wait()
                continue
            at, data = self.queue[0]
            now = trio.current_time()
            if at > now:
                await trio.sleep(at - now)
            self.queue.popleft()
            await dst.send_all(data)
            self.buffered -= len(data)
            self._wake()


class WanLink:
    """Forward ``127.0.0.1:<port>`` to ``target`` (host, port) through a :class:`LinkModel` per
    direction and connection. Run with ``await nursery.start(link.run)``; ``port`` is set once
    it listens. ``bytes_forwarded`` counts what crossed the link (both directions)."""

    def __init__(self, target: tuple[str, int], *, rtt_ms: float = 0.0, rate_mbit: float | None = None,
                 listen_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.listen_host = listen_host
        self.port = port
        self.rtt_ms = rtt_ms
        self.rate_mbit = rate_mbit
        self._models: list[LinkModel] = []
        self._dirs: list[_Direction] = []
        self.connections = 0

    @property
    def one_way(self) -> float:
        return self.rtt_ms / 2000.0

    @property
    def rate_bps(self) -> float | None:
        return self.rate_mbit * 1e6 if self.rate_mbit else None

    def set(self, *, rtt_ms: float, rate_mbit: float | None = None) -> None:
        """Change delay and rate for open and future connections."""
        LinkModel(rtt_ms / 2000.0, rate_mbit * 1e6 if rate_mbit else None)  # validates
        self.rtt_ms, self.rate_mbit = rtt_ms, rate_mbit
        for m in self._models:
            m.set(self.one_way, self.rate_bps)

    @property
    def bytes_forwarded(self) -> int:
        return sum(d.bytes for d in self._dirs)

    @property
    def address(self) -> str:
        return f"/ip4/{self.listen_host}/tcp/{self.port}"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError as e:
            log.warning("wanlink: cannot reach %s:%s: %s", *self.target, e)
            await client.aclose()
            return
        self.connections += 1
        dirs = []
        for _ in range(2):
            m = LinkModel(self.one_way, self.rate_bps)
            self._models.append(m)
            dirs.append(_Direction(m))
        self._dirs.extend(dirs)
        try:
            async with trio.open_nursery() as n:
                async def guarded(fn, stream) -> None:
                    try:
                        await fn(stream)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        log.debug("wanlink connection ended: %s", e)
                        n.cancel_scope.cancel()  # a reset ends the connection both ways

                n.start_soon(guarded, dirs[0].read_side, client)
                n.start_soon(guarded, dirs[0].write_side, upstream)
                n.start_soon(guarded, dirs[1].read_side, upstream)
                n.start_soon(guarded, dirs[1].write_side, client)
        finally:
            for s in (client, upstream):
                with contextlib.suppress(Exception):
                    await trio.aclose_forcefully(s)
            for d in dirs:
                self._models.remove(d.model)
