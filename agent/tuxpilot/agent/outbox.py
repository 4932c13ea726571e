"""Events waiting for the bus: while the server is unreachable the monitor keeps checking, and its
events wait here (bounded; the oldest go first) until the link returns."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from tuxpilot.lifetime import Part
from tuxpilot.protocol.models import Event

log = structlog.get_logger("tuxpilot.outbox")

Send = Callable[[Event], Awaitable[None]]


class Outbox(Part):
    """Events waiting for the bus, oldest first; `send` takes one to the bus or raises."""

    def __init__(self, send: Send, *, limit: int = 10_000):
        self._send = send
        self._queue: deque[Event] = deque(maxlen=limit)
        self._lock = asyncio.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    async def put(self, event: Event) -> None:
        """Queue `event` behind any waiting ones and try to send them all."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        await self.flush()

    async def flush(self) -> int:
        """Send what waits, oldest first; stop at the first failure (the link is still down)."""
        sent = 0
        async with self._lock:
            while self._queue:
                event = self._queue[0]
                try:
                    await self._send(event)
                except Exception as exc:
                    log.warning("outbox.waiting", queued=len(self._queue), error=f"{type(exc).__name__}: {exc}")
                    return sent
                self._queue.popleft()
                sent += 1
        if sent > 1 or self.dropped:
            log.info("outbox.flushed", sent=sent, dropped=self.dropped)
        return sent

    async def stop(self) -> None:
        """One last try to send what waits; what still cannot go is counted in the log, not kept."""
        if self._queue:
            await self.flush()
        if self._queue or self.dropped:
            log.warning("outbox.lost", unsent=len(self._queue), dropped=self.dropped)

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped
