"""The lifetime every long-lived part of a process shares: started and stopped as an async context
manager, so a process composes its parts with one `contextlib.AsyncExitStack` and they stop in reverse."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Self

import structlog

log = structlog.get_logger("tuxpilot.lifetime")

# How often, and for how long, `cancel` repeats a cancellation the task did not act on.
RECANCEL_EVERY_S = 0.05
RECANCEL_FOR_S = 10.0


class Part:
    """A part with `start()` and `stop()`; `async with part:` runs it.

    A part that fails half-way through `start()` is stopped before the error goes on, so `stop()` must
    cope with a partial start. A failure to stop is logged, not raised: the parts stopped after this one
    (those started before it) still stop.
    """

    async def start(self) -> None:
        """Bring the part up; it runs until `stop()`."""

    async def stop(self) -> None:
        """Bring the part down and leave no task running."""

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self._stop_logged()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop_logged()

    async def _stop_logged(self) -> None:
        try:
            await self.stop()
        except Exception:
            log.exception("part.stop_failed", part=type(self).__name__)


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until each has ended, cancelling again any that runs on.

    A single `task.cancel()` followed by `await task` can hang for good: on Python 3.11 `asyncio.wait_for`
    returns its result instead of raising when the cancellation arrives just as what it waited for
    finished (nats-py's `next_msg`, under every pull consumer's fetch, is built on it), and some library
    code turns a cancellation into an error that a loop then retries. Gives up, logged, after
    `RECANCEL_FOR_S` (the task is left to the event loop) rather than hang the stop that called it.
    What the tasks ended with is not raised: they were told to end.
    """
    running = {task for task in tasks if task is not None and not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECANCEL_FOR_S
    while running:
        if loop.time() > deadline:
            log.error("task.would_not_stop", tasks=sorted(t.get_name() for t in running), limit_s=RECANCEL_FOR_S)
            return
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=RECANCEL_EVERY_S)
        running = {task for task in running if not task.done()}
    for ended in tasks:
        if ended is not None and ended.done() and not ended.cancelled():
            ended.exception()  # retrieved: not reported as never retrieved
