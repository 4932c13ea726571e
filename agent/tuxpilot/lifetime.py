"""The lifetime every long-lived part of a process shares: started and stopped as an async context
manager, so a process composes its parts with one `contextlib.AsyncExitStack` and they stop in reverse."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import structlog

log = structlog.get_logger("tuxpilot.lifetime")


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
