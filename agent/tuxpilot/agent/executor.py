"""Requests from the gate to plugins' private execution endpoints, on one reply inbox of the gate's own.

Every request's reply subject is `<gate inbox>.<action id>`, so a reply is matched to its action by
subject, whenever it comes:
- in time: it answers the waiting request;
- after the link to the server was restored: the request is sent again with the same action id,
  which the plugin answers from its first run instead of running the action twice;
- after the request timed out (a plugin stopped, swapped out, or slower than its `timeout_s`): the
  action may well have run, so the reply is handed to `on_late`, and the gate records it as a
  follow-up outcome for the same action id — the audit converges to what really happened.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError

from tuxpilot.lifetime import cancel
from tuxpilot.protocol.names import ACTION_ID_HEADER

log = structlog.get_logger("tuxpilot.gate")

RESEND_ATTEMPTS = 3
LINK_POLL_S = 0.2
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"

T = TypeVar("T")


def _wake(woken: asyncio.Future[None], *_: object) -> None:
    if not woken.done():
        woken.set_result(None)


def no_responders(msg: Msg) -> bool:
    return not msg.data and (msg.headers or {}).get(STATUS_HEADER) == NO_RESPONDERS


class Executor(Generic[T]):
    """Sends requests and waits for their replies; keeps timed-out action ids on watch for a late reply.

    `T` is whatever the caller wants back with a late reply (the gate keeps the timeout's record).
    """

    def __init__(self, nc: Client, on_late: Callable[[T, Msg], Awaitable[None]], *, watch_s: float,
                 watch_max: int = 10_000):
        self.nc = nc
        self.on_late = on_late
        self.watch_s = watch_s
        self.watch_max = watch_max
        self.prefix = ""
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        # The futures `_watch_link` wakes on a reconnect (value True), so that their request is sent again.
        self._woken: dict[asyncio.Future[None], bool] = {}
        self._late: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._link_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Under the client's own inbox prefix: nats-server lets this user, and only it, read there.
        self.prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_reply)
        self._link_task = asyncio.create_task(self._watch_link(), name="gate-link")

    async def stop(self) -> None:
        if self._link_task is not None:
            self._link_task.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("gate.unsubscribe_failed", error=str(exc)[:200])
        await cancel(*self._tasks)

    async def request(self, subject: str, body: bytes, headers: dict[str, str], wait_s: float) -> Msg:
        """One request, sent again (same headers) if the link is restored while it waits.

        Raises NoRespondersError when nothing serves the subject, TimeoutError after `wait_s` seconds
        of silence (each re-send waits anew).
        """
        token = headers[ACTION_ID_HEADER]
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = reply
        resends, send = 0, True
        try:
            while True:
                if send:
                    await self.nc.publish(subject, body, reply=f"{self.prefix}.{token}", headers=headers)
                # One future, woken by the reply, the deadline or `_watch_link` on a reconnect: a task and
                # `asyncio.wait` for each request cost ~13 µs of CPU per action.
                woken: asyncio.Future[None] = loop.create_future()
                wake = functools.partial(_wake, woken)
                reply.add_done_callback(wake)
                timer = loop.call_later(wait_s, wake)
                self._woken[woken] = False
                try:
                    await woken
                finally:
                    reconnected = self._woken.pop(woken, False)
                    timer.cancel()
                    reply.remove_done_callback(wake)
                if reply.done():
                    msg = reply.result()
                    if no_responders(msg):
                        raise NoRespondersError
                    return msg
                if not reconnected:
                    raise TimeoutError
                # Woken by a reconnect: the request or its reply may have been lost with the old link.
                # Sent again a few times (the plugin replays the same action id); then only waited for.
                send = resends < RESEND_ATTEMPTS
                if send:
                    resends += 1
                    log.info("gate.request_resent", action_id=token, subject=subject, attempt=resends)
        finally:
            self._waiting.pop(token, None)

    def watch(self, action_id: str, what: T) -> None:
        """Wait a while for a late reply to `action_id`, whose request timed out."""
        loop_time = asyncio.get_running_loop().time()
        self._late[action_id] = (loop_time, what)
        while self._late:
            oldest_id, (since, _) = next(iter(self._late.items()))
            if len(self._late) <= self.watch_max and loop_time - since < self.watch_s:
                break
            self._late.pop(oldest_id)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self.prefix) + 1:]
        waiting = self._waiting.get(token)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)
        elif token in self._late and not no_responders(msg):
            since, what = self._late.pop(token)
            if asyncio.get_running_loop().time() - since <= self.watch_s:
                task: asyncio.Task[None] = asyncio.ensure_future(self.on_late(what, msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _watch_link(self) -> None:
        """Wake the requests waiting when the client has reconnected, so they are sent again."""
        seen = self.nc.stats["reconnects"]
        while True:
            await asyncio.sleep(LINK_POLL_S)
            now_seen = self.nc.stats["reconnects"]
            if now_seen != seen and self.nc.is_connected:
                seen = now_seen
                for woken in list(self._woken):
                    self._woken[woken] = True
                    _wake(woken)
