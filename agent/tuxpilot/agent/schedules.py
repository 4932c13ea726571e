"""Schedules: `[[schedules]]` that run actions through the gate on a cron expression or an interval.

APScheduler's cron and interval triggers decide the times, in the schedule's time zone. What happens to
a run the host missed (it was down at 03:00) is APScheduler's misfire policy, made explicit:
- The time of each schedule's last run is kept (by the caller, in JetStream); at start the job's next
  run is the first fire time after it, so runs missed while the agent was down are due at once.
- `coalesce = true` (the default): however many runs were missed, one run is made, for the latest.
- `misfire_grace_s` (default 3600): that run is made only if its time is no older than this; otherwise
  it is recorded as missed and the schedule goes on at its next time. A 03:00 job on a host back at
  03:40 runs at 03:40; on a host back at 09:00 it is missed, and runs again the next day at 03:00.
Schedules are host-local: each host's agent runs its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuxpilot.agent.rules import Name, RuleAction

log = structlog.get_logger("tuxpilot.schedules")


class Schedule(BaseModel):
    """`[[schedules]]`: a name, `cron` ("0 3 * * *") or `every_s`, a time zone, actions."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    cron: str | None = Field(None, description="Five crontab fields: minute hour day month day-of-week.")
    every_s: Annotated[float, Field(gt=0)] | None = Field(None, description="Interval in seconds.")
    timezone: str = "UTC"
    actions: list[RuleAction] = Field(min_length=1)
    misfire_grace_s: Annotated[float, Field(ge=1)] = Field(
        3600.0, description="A run missed (host down, agent stopped) is still made if no older than this."
    )
    coalesce: bool = Field(True, description="Several missed runs are made as one.")
    enabled: bool = True

    @model_validator(mode="after")
    def _one_trigger(self) -> Self:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give exactly one of cron and every_s")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r}") from None
        self.trigger()  # a bad cron expression is refused at load, not at 03:00
        return self

    def trigger(self, since: datetime | None = None) -> BaseTrigger:
        """The APScheduler trigger; an interval counts from `since` (the last run, or now)."""
        zone = ZoneInfo(self.timezone)
        if self.cron is not None:
            return CronTrigger.from_crontab(self.cron, timezone=zone)
        assert self.every_s is not None
        start = (since or datetime.now(UTC)) + timedelta(seconds=self.every_s)
        return IntervalTrigger(seconds=self.every_s, timezone=zone, start_date=start)


Fire = Callable[[Schedule], Awaitable[Any]]
Missed = Callable[[Schedule, datetime], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class Upcoming:
    name: str
    next_run: datetime | None
    spec: Schedule


class Schedules:
    """The host's schedules on one APScheduler (asyncio) scheduler.

    `fire` runs a schedule's actions (through the gate); `missed` is told of a run too old to make;
    `last_runs` are the times each schedule last ran, so that runs missed while down are seen as such.
    """

    def __init__(self, schedules: Iterable[Schedule], fire: Fire, missed: Missed,
                 last_runs: dict[str, datetime] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()
        self.specs = {s.name: s for s in schedules if s.enabled}
        self.fire, self.missed = fire, missed
        self.last_runs = dict(last_runs or {})
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED)

    def start(self) -> None:
        for spec in self.specs.values():
            self._add(spec)
        self.scheduler.start()
        log.info("schedules.started", schedules=sorted(self.specs))

    def _add(self, spec: Schedule) -> None:
        last = self.last_runs.get(spec.name)
        trigger = spec.trigger(last or self.clock())
        options: dict[str, Any] = {}
        if last is not None:
            # Resume after the last run made: anything due since is a misfire, for APScheduler to coalesce
            # and to weigh against the grace time.
            options["next_run_time"] = trigger.get_next_fire_time(None, last.astimezone(UTC))
        self.scheduler.add_job(
            self._run, trigger, args=[spec.name], id=spec.name, name=spec.name, max_instances=1,
            misfire_grace_time=int(spec.misfire_grace_s), coalesce=spec.coalesce, replace_existing=True,
            **options,
        )

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def upcoming(self) -> list[Upcoming]:
        out = []
        for name, spec in sorted(self.specs.items()):
            job = self.scheduler.get_job(name)
            out.append(Upcoming(name, job.next_run_time if job is not None else None, spec))
        return out

    async def run(self, name: str) -> Any:
        """Run a schedule now (`tuxpilot schedule run NAME`), outside its times."""
        return await self._run(name)

    async def _run(self, name: str) -> Any:
        spec = self.specs[name]
        self.last_runs[name] = self.clock()
        log.info("schedule.fired", schedule=name)
        return await self.fire(spec)

    def _on_missed(self, event: JobExecutionEvent) -> None:
        spec = self.specs.get(event.job_id)
        if spec is None:
            return
        log.warning("schedule.missed", schedule=spec.name, scheduled=event.scheduled_run_time.isoformat())
        self.last_runs[spec.name] = event.scheduled_run_time
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(self.missed(spec, event.scheduled_run_time))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def upcoming_times(spec: Schedule, after: datetime, count: int = 3) -> list[datetime]:
    """The next `count` fire times after `after`: what `schedule list` shows without a running agent."""
    trigger, out, previous = spec.trigger(), [], None
    at = after
    for _ in range(count):
        nxt = trigger.get_next_fire_time(previous, at)
        if nxt is None:
            break
        out.append(nxt)
        previous, at = nxt, nxt
    return out
