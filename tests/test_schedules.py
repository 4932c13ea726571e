"""Schedules on APScheduler's own triggers, driven by a controllable clock, never by sleeping.

APScheduler reads the time with `datetime.now` in its scheduler and executor modules; the test puts
its own clock there and calls `wakeup()`, which is what the scheduler's timer would do.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import apscheduler.executors.base
import apscheduler.schedulers.base
import pytest
from tuxpilot.agent.schedules import Schedule, Schedules, upcoming_times

ACTIONS = [{"plugin": "docker", "action": "prune", "params": {"what": "images"}}]


class Clock:
    at = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


class FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> FrozenDatetime:  # type: ignore[override]
        at = Clock.at.astimezone(tz) if tz is not None else Clock.at.replace(tzinfo=None)
        return cls.fromtimestamp(at.timestamp(), tz)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> type[Clock]:
    Clock.at = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    monkeypatch.setattr(apscheduler.schedulers.base, "datetime", FrozenDatetime)
    monkeypatch.setattr(apscheduler.executors.base, "datetime", FrozenDatetime)
    return Clock


class Runs:
    def __init__(self) -> None:
        self.fired: list[tuple[str, datetime]] = []
        self.missed: list[tuple[str, datetime]] = []
        self.changed = asyncio.Event()

    async def fire(self, spec: Schedule) -> None:
        self.fired.append((spec.name, Clock.at))
        self.changed.set()

    async def miss(self, spec: Schedule, when: datetime) -> None:
        self.missed.append((spec.name, when))
        self.changed.set()

    async def tick(self, schedules: Schedules, to: datetime) -> None:
        """Move the clock and let APScheduler process its jobs, as its timer would."""
        Clock.at = to
        self.changed.clear()
        schedules.scheduler.wakeup()
        for _ in range(20):  # the job runs as a task on this loop; a few turns of the loop, no waiting on time
            await asyncio.sleep(0)


def nightly(**kw: Any) -> Schedule:
    return Schedule.model_validate({"name": "nightly", "cron": "0 3 * * *", "timezone": "UTC", "actions": ACTIONS,
                                    **kw})


async def test_fires_at_its_time_and_not_before(clock: type[Clock]) -> None:
    runs = Runs()
    schedules = Schedules([nightly()], runs.fire, runs.miss, clock=lambda: Clock.at)
    schedules.start()
    try:
        [up] = schedules.upcoming()
        assert up.next_run == datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
        await runs.tick(schedules, datetime(2026, 3, 1, 2, 59, tzinfo=UTC))
        assert runs.fired == []
        await runs.tick(schedules, datetime(2026, 3, 1, 3, 0, 1, tzinfo=UTC))
        assert [name for name, _ in runs.fired] == ["nightly"]
        assert schedules.upcoming()[0].next_run == datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
    finally:
        schedules.stop()


async def test_missed_within_grace_runs_once_coalesced(clock: type[Clock]) -> None:
    """Down from before 03:00 on the 1st until 03:40 on the 3rd: three runs missed, one is made."""
    runs = Runs()
    clock.at = datetime(2026, 3, 3, 3, 40, tzinfo=UTC)
    last = {"nightly": datetime(2026, 2, 28, 3, 0, tzinfo=UTC)}
    schedules = Schedules([nightly()], runs.fire, runs.miss, last_runs=last, clock=lambda: Clock.at)
    schedules.start()
    try:
        await runs.tick(schedules, clock.at)
        assert len(runs.fired) == 1 and runs.missed == []
        assert schedules.upcoming()[0].next_run == datetime(2026, 3, 4, 3, 0, tzinfo=UTC)
    finally:
        schedules.stop()


async def test_missed_beyond_grace_is_recorded_not_run(clock: type[Clock]) -> None:
    """Back at 09:00 with a grace of one hour: the 03:00 run is missed, the next one is tomorrow."""
    runs = Runs()
    clock.at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    last = {"nightly": datetime(2026, 2, 28, 3, 0, tzinfo=UTC)}
    schedules = Schedules([nightly()], runs.fire, runs.miss, last_runs=last, clock=lambda: Clock.at)
    schedules.start()
    try:
        await runs.tick(schedules, clock.at)
        assert runs.fired == []
        assert runs.missed == [("nightly", datetime(2026, 3, 1, 3, 0, tzinfo=UTC))]
        assert schedules.upcoming()[0].next_run == datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
    finally:
        schedules.stop()


async def test_without_coalescing_each_missed_run_is_made(clock: type[Clock]) -> None:
    runs = Runs()
    clock.at = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    spec = Schedule.model_validate({"name": "often", "every_s": 600, "actions": ACTIONS, "coalesce": False,
                                    "misfire_grace_s": 3600})
    last = {"often": datetime(2026, 3, 1, 2, 0, tzinfo=UTC)}
    schedules = Schedules([spec], runs.fire, runs.miss, last_runs=last, clock=lambda: Clock.at)
    schedules.start()
    try:
        await runs.tick(schedules, clock.at)
        assert len(runs.fired) == 3  # 02:10, 02:20, 02:30
    finally:
        schedules.stop()


def test_time_zone_and_bad_specs() -> None:
    spec = nightly(timezone="Europe/Paris")
    first = upcoming_times(spec, datetime(2026, 3, 1, 0, 0, tzinfo=UTC))[0]
    assert first == datetime(2026, 3, 1, 3, 0, tzinfo=first.tzinfo) and first.utcoffset() == timedelta(hours=1)
    for bad in ({"cron": "0 3 * *"}, {"cron": None}, {"every_s": 5}, {"timezone": "Mars/Olympus"}):
        with pytest.raises(ValueError, match="validation error"):
            Schedule.model_validate({"name": "x", "cron": "0 3 * * *", "actions": ACTIONS, **bad})
