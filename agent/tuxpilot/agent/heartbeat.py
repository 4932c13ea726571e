"""This host's heartbeat in the fleet bucket, and the fleet's join/loss events.

On its first beat a host that was never seen, or was lost, says `fleet.host_joined`. Each tick the
alive host with the smallest id (so one host, not all) says `fleet.host_lost` once for each host whose
last beat has grown older than its ttl. Plugins subscribe to both like any event.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

import structlog
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from tuxpilot import __version__
from tuxpilot.fleet.heartbeat import Beat, judge, read_beat
from tuxpilot.lifetime import cancel
from tuxpilot.protocol.models import Event

log = structlog.get_logger("tuxpilot.heartbeat")


class Heartbeat:
    def __init__(self, kv: KeyValue, host: str, labels: dict[str, str], every_s: float,
                 publish: Callable[[Event], Awaitable[None]]):
        self.kv, self.host, self.labels, self.every_s, self.publish = kv, host, labels, every_s, publish
        self.plugins: dict[str, str] = {}
        self.last_event: str | None = None
        self.last_error: str | None = None
        self.started = time.time()
        self._said_lost: set[tuple[str, float]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl_s(self) -> float:
        return 3 * self.every_s  # two beats may be missed (a reconnect) before the host counts as lost

    async def __aenter__(self) -> Heartbeat:
        previous = await read_beat(self.kv, self.host)
        await self.beat()
        if previous is None or judge(self.host, {}, previous).state == "lost":
            await self.publish(Event.new("fleet.host_joined", self.host, severity="info",
                                         data={"labels": self.labels, "version": __version__}))
        self._task = asyncio.create_task(self._run(), name="heartbeat")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            await cancel(self._task)

    async def beat(self) -> None:
        doc = Beat(host=self.host, version=__version__, labels=self.labels, plugins=dict(self.plugins),
                   last_event=self.last_event, last_error=self.last_error, started=self.started,
                   at=time.time(), ttl_s=self.ttl_s)
        await self.kv.put(self.host, doc.model_dump_json().encode())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.beat()
                await self._say_lost()
            except Exception as exc:  # a missed beat is retried on the next tick; the agent lives on
                log.warning("heartbeat.failed", error=f"{type(exc).__name__}: {exc}")

    async def _say_lost(self) -> None:
        try:
            hosts = await self.kv.keys()
        except NoKeysError:
            return
        beats = {h: await read_beat(self.kv, h) for h in hosts}
        status = {h: judge(h, {}, b) for h, b in beats.items()}
        alive = sorted(h for h, s in status.items() if s.state == "alive")
        if not alive or alive[0] != self.host:
            return  # the smallest alive host speaks for the fleet
        for host, st in status.items():
            if st.state != "lost" or st.beat is None or (host, st.beat.at) in self._said_lost:
                continue
            self._said_lost.add((host, st.beat.at))
            log.warning("fleet.host_lost", host=host, last_beat=st.beat.at)
            event = Event.new("fleet.host_lost", self.host, data={"lost": host, "last_beat": st.beat.at,
                                                                 "labels": st.beat.labels})
            # One loss, one id, whoever says it: on a loaded machine two hosts can each think themselves the
            # smallest alive one for a tick, and the events stream keeps the first and drops the other
            # (the id is the message id), so a plugin's durable consumer sees the loss once.
            event.id = lost_event_id(host, st.beat.at)
            await self.publish(event)


def lost_event_id(host: str, last_beat: float) -> str:
    """The id of the `fleet.host_lost` event for `host` silent since `last_beat`, the same on every host."""
    return hashlib.sha256(f"fleet.host_lost\0{host}\0{last_beat!r}".encode()).hexdigest()[:32]
