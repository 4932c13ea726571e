"""A durable JetStream pull consumer that keeps pulling: through server restarts, lost consumers and stalls.

nats.py pull subscriptions can stop receiving after a server restart (nats.py #504); so when a fetch
fails, or the consumer reports pending messages that fetches do not bring, the subscription is
bound again (and the consumer re-created if the server lost it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

log = structlog.get_logger("tuxpilot.consumer")

Handler = Callable[[Msg], Awaitable[None]]
# Consecutive empty fetches after which the consumer's own figures are checked for a stall.
_STALL_CHECK_EVERY = 5


def redelivery_delay(backoff: list[float], delivered: int) -> float:
    """The nak delay after the `delivered`-th delivery failed."""
    if not backoff:
        return 1.0
    return backoff[min(max(delivered, 1), len(backoff)) - 1]


class Durable:
    """Pulls `stream` through the durable consumer `name`; `handler` acks, naks or terms each message."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        name: str,
        filter_subjects: list[str],
        handler: Handler,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        backoff: list[float] | None = None,
        batch: int = 256,
        max_in_flight: int = 512,
        metadata: dict[str, str] | None = None,
    ):
        self.js = js
        self.stream = stream
        self.name = name
        self.handler = handler
        self.batch = batch
        self.backoff = backoff or []
        self.config = ConsumerConfig(
            durable_name=name,
            filter_subjects=filter_subjects,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_in_flight * 2,
            metadata=metadata,
        )
        self.log = log.bind(stream=stream, consumer=name)
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        # Each message is handled in its own task, so one slow message never holds up the rest;
        # the semaphore bounds how many are in flight (back-pressure instead of a growing backlog).
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.rebinds = 0

    async def start(self) -> None:
        await self._bind()
        self._task = asyncio.create_task(self._pull(), name=f"consumer-{self.name}")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop pulling, give handlers in flight `grace_s` to finish (unacked ones are redelivered)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _bind(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        await self.ensure()
        self._sub = await self.js.pull_subscribe_bind(durable=self.name, stream=self.stream)

    async def ensure(self) -> None:
        """Create the consumer, or update it when its filters changed; leave a matching one alone.

        Asking first matters under generated authorization: a plugin may read its consumer's info
        but not create one (the agent creates it from the manifest).
        """
        try:
            info = await self.js.consumer_info(self.stream, self.name)
            if sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) == sorted(
                self.config.filter_subjects or []
            ):
                return
        except NotFoundError:
            pass
        await self.js.add_consumer(self.stream, config=self.config)

    async def _pull(self) -> None:
        empty = 0
        while True:
            try:
                msgs = await self._sub.fetch(self.batch, timeout=1.0)
            except (NatsTimeout, TimeoutError):
                empty += 1
                if empty % _STALL_CHECK_EVERY == 0 and await self._stalled():
                    await self._rebind("stalled")
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._rebind(f"{type(exc).__name__}: {exc}")
                continue
            empty = 0
            for msg in msgs:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        try:
            await self.handler(msg)
        except Exception:
            self.log.exception("consumer.handler_failed", subject=msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=redelivery_delay(self.backoff, msg.metadata.num_delivered))
        finally:
            self._slots.release()

    async def _stalled(self) -> bool:
        try:
            info = await self._sub.consumer_info()
        except Exception:
            return True
        return bool(info.num_pending)

    async def _rebind(self, why: str) -> None:
        self.rebinds += 1
        self.log.warning("consumer.rebind", why=why[:200], rebinds=self.rebinds)
        while True:
            try:
                await self._bind()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.debug("consumer.bind_failed", error=str(exc)[:200])
                await asyncio.sleep(1.0)
