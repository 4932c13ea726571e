"""A durable JetStream pull consumer that keeps pulling: through server restarts, lost consumers, stalls
and consumers someone else changed.

nats.py pull subscriptions can stop receiving after a server restart (nats.py #504); so when a fetch
fails, or the consumer reports pending messages that fetches do not bring, the subscription is
bound again (and the consumer re-created if the server lost it). A JetStream "create" on an existing
durable updates it, so whoever may create consumers can re-point ours at a subject nobody publishes
to: its config is checked when it is bound and every few seconds, and restored (`consumer.restored`)
together with the messages it skipped meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from tuxpilot.lifetime import cancel

log = structlog.get_logger("tuxpilot.consumer")

Handler = Callable[[Msg], Awaitable[None]]
# Consecutive empty fetches after which the consumer's own figures are checked for a stall.
_STALL_CHECK_EVERY = 5
# How often the consumer's config is compared with ours while pulling.
CHECK_EVERY_S = 5.0
# What we set and someone else could change with an update; the deliver policy cannot be updated.
_CHECKED = ("ack_policy", "ack_wait", "max_deliver", "max_ack_pending", "backoff", "inactive_threshold")


def redelivery_delay(backoff: list[float], delivered: int) -> float:
    """The nak delay after the `delivered`-th delivery failed."""
    if not backoff:
        return 1.0
    return backoff[min(max(delivered, 1), len(backoff)) - 1]


def _filters(config: ConsumerConfig) -> list[str]:
    return sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


def differences(want: ConsumerConfig, have: ConsumerConfig) -> list[str]:
    """The fields of `have` that are not as `want` sets them (its metadata: only the keys `want` sets)."""
    changed = [name for name in _CHECKED if (getattr(want, name) or None) != (getattr(have, name) or None)]
    if _filters(want) != _filters(have):
        changed.append("filter_subjects")
    if any((have.metadata or {}).get(k) != v for k, v in (want.metadata or {}).items()):
        changed.append("metadata")
    if have.durable_name != want.durable_name:
        changed.append("durable_name")
    return changed


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
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        restore: bool = True,
    ):
        self.js = js
        self.stream = stream
        self.name = name
        self.handler = handler
        self.batch = batch
        self.backoff = backoff or []
        # Turned off once a restore is refused (a plugin's user may not create consumers): from then
        # on a change is only logged, and the agent, which created the consumer, restores it.
        self.restore = restore
        self.config = ConsumerConfig(
            durable_name=name,
            filter_subjects=filter_subjects,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_in_flight * 2,
            metadata=metadata,
            deliver_policy=deliver_policy,
        )
        self.log = log.bind(stream=stream, consumer=name)
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        # Each message is handled in its own task, so one slow message never holds up the rest;
        # the semaphore bounds how many are in flight (back-pressure instead of a growing backlog).
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        # Stream sequences being handled, and the highest received: where to resume after a restore.
        self._handling: set[int] = set()
        self._highest = 0
        self.rebinds = 0
        self.restored = 0

    async def start(self) -> None:
        await self._bind()
        self._task = asyncio.create_task(self._pull(), name=f"consumer-{self.name}")

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop pulling, give handlers in flight `grace_s` to finish (unacked ones are redelivered)."""
        if self._task is not None:
            await cancel(self._task)
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
        """Create the consumer, or restore it when it is not as configured; leave a matching one alone.

        Asking first matters under generated authorization: a plugin may read its consumer's info
        but not create one (the agent creates it from the manifest, and restores it).
        """
        try:
            info = await self.js.consumer_info(self.stream, self.name)
        except NotFoundError:
            await self.js.add_consumer(self.stream, config=self.config)
            return
        changed = differences(self.config, info.config)
        if not changed:
            return
        if self.restore:
            try:
                await self._restore(info, changed)
                return
            except Exception as exc:  # not ours to restore (a plugin's user may not): the agent will
                self.restore = False
                self.log.warning("consumer.restore_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        self.log.warning("consumer.changed", fields=changed, filter_subjects=_filters(info.config))

    async def _restore(self, info: Any, changed: list[str]) -> None:
        """Put our config back. With other filters the consumer skipped our messages stored meanwhile, and
        putting the filters back does not bring them back: then it is made again from the first message
        that may not have been handled (handled twice is safe here; proposals and actions are deduplicated)."""
        if "filter_subjects" not in changed and "durable_name" not in changed:
            await self.js.add_consumer(self.stream, config=self.config)  # an update keeps the position
            start = None
        else:
            acked = info.ack_floor.stream_seq + 1 if info.ack_floor else 1
            ours = min(self._handling) if self._handling else (self._highest + 1 if self._highest else acked)
            start = max(1, min(acked, ours))
            with contextlib.suppress(NotFoundError):
                await self.js.delete_consumer(self.stream, self.name)
            config = dataclasses.replace(
                self.config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            )
            await self.js.add_consumer(self.stream, config=config)
        self.restored += 1
        self.log.warning(
            "consumer.restored", fields=changed, found_filters=_filters(info.config), resume_seq=start,
            restored=self.restored,
        )

    async def _pull(self) -> None:
        empty = 0
        loop = asyncio.get_running_loop()
        next_check = loop.time() + CHECK_EVERY_S
        while True:
            if loop.time() >= next_check:
                next_check = loop.time() + CHECK_EVERY_S
                why = await self._inspect(stalled_if_pending=empty >= _STALL_CHECK_EVERY)
                if why:
                    await self._rebind(why)
            try:
                msgs = await self._sub.fetch(self.batch, timeout=1.0)
            except (NatsTimeout, TimeoutError):
                empty += 1
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._rebind(f"{type(exc).__name__}: {exc}")
                continue
            empty = 0
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                self._handling.add(seq)
                self._highest = max(self._highest, seq)
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
            self._handling.discard(msg.metadata.sequence.stream)
            self._slots.release()

    async def _inspect(self, *, stalled_if_pending: bool) -> str | None:
        """Why the subscription should be bound again, if it should: the consumer is gone or unreadable,
        changed by someone else, or reports pending messages that fetches do not bring."""
        try:
            info = await self.js.consumer_info(self.stream, self.name)
        except Exception as exc:
            return f"consumer unreadable: {type(exc).__name__}: {exc}"
        changed = differences(self.config, info.config)
        if changed and self.restore:
            return f"config changed: {', '.join(changed)}"
        if changed:
            self.log.warning("consumer.changed", fields=changed, filter_subjects=_filters(info.config))
        if stalled_if_pending and info.num_pending:
            return "stalled"
        return None

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
