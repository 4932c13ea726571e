"""The host monitor: psutil readings, threshold checks with hysteresis, and the schedule that runs them.

It owns turning the host's figures into events (`memory.high`, `disk.low`, … and their `*.ok` clears) and
periodic metrics snapshots; publishing them is the caller's, through the two callbacks it is given.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psutil
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tuxpilot.agent.config import CheckConfig, MonitorConfig
from tuxpilot.lifetime import Part, cancel
from tuxpilot.protocol.models import DiskUsage, Event, Metrics, Severity, Usage

log = structlog.get_logger("tuxpilot.monitor")

Transition = Literal["fire", "clear"]
SOURCE = "monitor"
STOP_GRACE_S = 2.0


class Hysteresis:
    """One threshold with hysteresis and a sustain time, driven by readings; no clock inside.

    Fires once the value has stayed at or above `threshold` for `sustain_s` seconds (a reading below the
    threshold restarts that wait), then stays fired until a reading falls below `clear`, which clears it and
    re-arms it. Readings that are not finite are ignored.
    """

    __slots__ = ("_above_since", "_firing", "clear", "sustain_s", "threshold")

    def __init__(self, threshold: float, clear: float, sustain_s: float = 0.0) -> None:
        if clear > threshold:
            raise ValueError(f"clear ({clear}) must not be above threshold ({threshold})")
        if sustain_s < 0:
            raise ValueError(f"sustain_s must not be negative (got {sustain_s})")
        self.threshold = threshold
        self.clear = clear
        self.sustain_s = sustain_s
        self._firing = False
        self._above_since: float | None = None

    @classmethod
    def of(cls, check: CheckConfig) -> Hysteresis:
        return cls(check.threshold, check.clear, check.sustain_s)

    @property
    def firing(self) -> bool:
        return self._firing

    def update(self, value: float, now: float) -> Transition | None:
        """Feed one reading taken at `now` (seconds, any monotonic origin); the transition it causes, if any."""
        if not math.isfinite(value):
            return None
        if self._firing:
            if value < self.clear:
                self._firing = False
                return "clear"
            return None
        if value < self.threshold:
            self._above_since = None
            return None
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since >= self.sustain_s:
            self._firing = True
            self._above_since = None
            return "fire"
        return None


def severity(value: float, threshold: float, ceiling: float | None) -> Severity:
    """`critical` from halfway between the threshold and `ceiling` (100 for a percentage: 90 → 95) up;
    with no ceiling (load per core), from twice the threshold up; `warning` below."""
    critical_at = threshold + (ceiling - threshold) / 2 if ceiling is not None else threshold * 2
    return "critical" if value >= critical_at else "warning"


@dataclass(frozen=True, slots=True)
class Reading:
    """The host's figures at one moment: what the checks look at and what a metrics snapshot carries."""

    memory: Usage
    swap: Usage
    cpu_percent: float
    cpu_count: int
    load: tuple[float, float, float]
    disks: tuple[DiskUsage, ...] = ()
    uptime_s: float | None = None
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def load_per_core(self) -> float:
        """The 1-minute load average divided by the number of CPUs."""
        return self.load[0] / max(1, self.cpu_count)

    def to_metrics(self, host: str) -> Metrics:
        return Metrics(
            host=host,
            time=self.time,
            cpu_percent=_percent(self.cpu_percent),
            cpu_count=max(1, self.cpu_count),
            load=[max(0.0, x) for x in self.load],
            memory=self.memory,
            swap=self.swap,
            disks=list(self.disks),
            uptime_s=self.uptime_s,
        )


def _percent(value: float) -> float:
    return min(100.0, max(0.0, float(value)))


def read_disks(ignore_fstypes: list[str]) -> tuple[DiskUsage, ...]:
    """Usage of every real mount (psutil's `all=False` leaves out pseudo filesystems), one per mountpoint."""
    ignored = set(ignore_fstypes)
    found: dict[str, DiskUsage] = {}
    for part in psutil.disk_partitions(all=False):
        if part.fstype in ignored or part.mountpoint in found:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError as exc:
            # A mount we may not stat (permissions, a vanished or stale mount) is skipped, not fatal.
            log.debug("monitor.disk_unreadable", mountpoint=part.mountpoint, error=str(exc))
            continue
        if usage.total == 0:
            continue
        found[part.mountpoint] = DiskUsage(
            mountpoint=part.mountpoint,
            device=part.device,
            fstype=part.fstype,
            total=usage.total,
            used=usage.used,
            available=usage.free,
            percent=_percent(usage.percent),
        )
    return tuple(found.values())


def read_system(config: MonitorConfig) -> Reading:
    """The host's figures from psutil. CPU percent is measured since the previous call from the same
    thread (the first call in a thread reads 0.0, which primes it), so readings belong on one thread."""
    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    load1, load5, load15 = psutil.getloadavg()
    return Reading(
        memory=Usage(total=vm.total, used=vm.used, available=vm.available, percent=_percent(vm.percent)),
        swap=Usage(total=sw.total, used=sw.used, available=sw.free, percent=_percent(sw.percent)),
        cpu_percent=_percent(psutil.cpu_percent(interval=None)),
        cpu_count=psutil.cpu_count() or 1,
        load=(load1, load5, load15),
        disks=read_disks(config.ignore_fstypes),
        uptime_s=max(0.0, time.time() - psutil.boot_time()),
    )


@dataclass(frozen=True, slots=True)
class _Kind:
    """What one check's events look like."""

    fire: str
    clear: str
    unit: str
    ceiling: float | None


_KINDS: dict[str, _Kind] = {
    "memory": _Kind("memory.high", "memory.ok", "%", 100.0),
    "swap": _Kind("swap.high", "swap.ok", "%", 100.0),
    "cpu": _Kind("cpu.high", "cpu.ok", "%", 100.0),
    "load": _Kind("load.high", "load.ok", "load/core", None),
    "disk": _Kind("disk.low", "disk.ok", "%", 100.0),
}


def _usage_data(usage: Usage | DiskUsage) -> dict[str, Any]:
    return usage.model_dump(mode="json", exclude_none=True, exclude={"percent"})


class Monitor(Part):
    """Runs the checks every `interval_s` and publishes a metrics snapshot every `metrics_interval_s`.

    Events: a check crossing its threshold (and holding for its sustain time) publishes one `<check>.high`
    (`disk.low` for a mount) event; falling below its clear level publishes one `<check>.ok`, severity `info`.
    `value` is the reading (percent, or 1-minute load per core), `threshold` the level crossed (the threshold
    when firing, the clear level when clearing), `resource` the mountpoint for disks. Severity is `warning`,
    or `critical` at or above halfway from the threshold to 100% (twice the threshold for load), decided
    when the event fires. Disks are tracked per mountpoint; a mount that disappears drops its state silently.
    A failed publish is logged and not retried; the check's state has moved on regardless.
    """

    def __init__(
        self,
        config: MonitorConfig,
        host: str,
        publish_event: Callable[[Event], Awaitable[None]],
        publish_metrics: Callable[[Metrics], Awaitable[None]],
        reader: Callable[[], Reading] | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self._publish_event = publish_event
        self._publish_metrics = publish_metrics
        self._reader: Callable[[], Reading] = reader or functools.partial(read_system, config)
        self._checks: dict[str, Hysteresis] = {
            name: Hysteresis.of(check)
            for name, check in (
                ("memory", config.memory),
                ("swap", config.swap),
                ("cpu", config.cpu),
                ("load", config.load),
            )
            if check.enabled
        }
        self._disks: dict[str, Hysteresis] = {}
        self._scheduler: AsyncIOScheduler | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self._cancelled: set[asyncio.Task[Any]] = set()
        self.last_reading: Reading | None = None
        self._last_read_at: float | None = None
        self.first_check_done = asyncio.Event()

    # -- pure part: readings in, events out ------------------------------------------------------------

    def evaluate(self, reading: Reading, now: float) -> list[Event]:
        """Drive the checks with one reading taken at `now` (monotonic seconds); the events it causes."""
        events: list[Event] = []
        host_values: dict[str, tuple[float, dict[str, Any]]] = {
            "memory": (reading.memory.percent, _usage_data(reading.memory)),
            "swap": (reading.swap.percent, _usage_data(reading.swap)),
            "cpu": (reading.cpu_percent, {"cpu_count": reading.cpu_count, "load": list(reading.load)}),
            "load": (reading.load_per_core, {"load": list(reading.load), "cpu_count": reading.cpu_count}),
        }
        for name, machine in self._checks.items():
            value, data = host_values[name]
            event = self._transition(name, machine, value, now, data)
            if event is not None:
                events.append(event)
        if self.config.disk.enabled:
            events.extend(self._evaluate_disks(reading.disks, now))
        return events

    def _evaluate_disks(self, disks: tuple[DiskUsage, ...], now: float) -> list[Event]:
        events: list[Event] = []
        seen: set[str] = set()
        for disk in disks:
            seen.add(disk.mountpoint)
            machine = self._disks.get(disk.mountpoint)
            if machine is None:
                machine = self._disks[disk.mountpoint] = Hysteresis.of(self.config.disk)
            data = _usage_data(disk)
            data.pop("mountpoint")
            event = self._transition("disk", machine, disk.percent, now, data, resource=disk.mountpoint)
            if event is not None:
                events.append(event)
        for gone in self._disks.keys() - seen:
            del self._disks[gone]
        return events

    def _transition(
        self,
        name: str,
        machine: Hysteresis,
        value: float,
        now: float,
        data: dict[str, Any],
        resource: str | None = None,
    ) -> Event | None:
        change = machine.update(value, now)
        if change is None:
            return None
        kind = _KINDS[name]
        firing = change == "fire"
        return Event.new(
            kind.fire if firing else kind.clear,
            self.host,
            severity=severity(value, machine.threshold, kind.ceiling) if firing else "info",
            source=SOURCE,
            value=round(value, 3),
            threshold=machine.threshold if firing else machine.clear,
            unit=kind.unit,
            resource=resource,
            ttl=self.config.event_ttl_s,
            data=data,
        )

    # -- I/O: read, publish, schedule ------------------------------------------------------------------

    def read(self) -> Reading:
        """One reading from the reader (psutil unless one was injected), kept as `last_reading`."""
        reading = self._reader()
        self.last_reading = reading
        self._last_read_at = time.monotonic()
        return reading

    async def tick(self, now: float | None = None) -> list[Event]:
        """One round: read, evaluate, publish each event. A failed publish is logged; a failed read raises."""
        reading = self.read()
        events = self.evaluate(reading, time.monotonic() if now is None else now)
        for event in events:
            log.info(
                "monitor.event",
                type=event.type,
                severity=event.severity,
                value=event.value,
                threshold=event.threshold,
                resource=event.resource,
            )
            try:
                await self._publish_event(event)
            except Exception:
                log.exception("monitor.publish_failed", type=event.type, event_id=event.id, resource=event.resource)
        return events

    async def publish_snapshot(self) -> Metrics:
        """Publish a metrics snapshot and return it. It reuses the latest check's reading when that is at most
        one check interval old (a second CPU read would split the checks' CPU measuring window), else reads."""
        reading = self.last_reading
        fresh = self._last_read_at is not None and time.monotonic() - self._last_read_at <= self.config.interval_s
        if reading is None or not fresh:
            reading = self.read()
        metrics = reading.to_metrics(self.host)
        try:
            await self._publish_metrics(metrics)
        except Exception:
            log.exception("monitor.metrics_publish_failed")
        return metrics

    async def _guarded(self, job: Callable[[], Awaitable[object]], what: str) -> None:
        """Run `job`, logging whatever fails, so that a scheduled job runs again at its next time."""
        try:
            await job()
        except Exception:
            log.exception("monitor.job_failed", job=what)

    async def _scheduled(self, job: Callable[[], Awaitable[object]], what: str) -> None:
        """A run started by the scheduler, tracked so that `stop` can wait for it."""
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await self._guarded(job, what)
        except asyncio.CancelledError:
            if task not in self._cancelled:
                raise
            # `stop` cut short a run that outlived its grace time: not a failure for APScheduler to report.
            task.uncancel()
            log.warning("monitor.job_cancelled", job=what)
        finally:
            self._running.discard(task)
            self._cancelled.discard(task)

    async def start(self) -> None:
        """Run the first check (then `first_check_done` is set) and first snapshot, then schedule both."""
        if self._scheduler is not None:
            return
        await self._guarded(self.tick, "check")
        self.first_check_done.set()
        await self._guarded(self.publish_snapshot, "metrics")
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        options: dict[str, Any] = {"trigger": "interval", "coalesce": True, "max_instances": 1}
        scheduler.add_job(
            self._scheduled,
            args=[self.tick, "check"],
            id="check",
            seconds=self.config.interval_s,
            misfire_grace_time=max(1, math.ceil(self.config.interval_s)),
            **options,
        )
        scheduler.add_job(
            self._scheduled,
            args=[self.publish_snapshot, "metrics"],
            id="metrics",
            seconds=self.config.metrics_interval_s,
            misfire_grace_time=max(1, math.ceil(self.config.metrics_interval_s)),
            **options,
        )
        scheduler.start()
        self._scheduler = scheduler
        log.info(
            "monitor.started",
            host=self.host,
            interval_s=self.config.interval_s,
            metrics_interval_s=self.config.metrics_interval_s,
            checks=sorted([*self._checks, *(["disk"] if self.config.disk.enabled else [])]),
        )

    async def stop(self) -> None:
        """Stop scheduling, let a run in progress finish (up to STOP_GRACE_S, then cancel it), leave no task."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        scheduler.remove_all_jobs()
        # A run submitted just now starts on the next loop iteration; let it start so it is waited for.
        await asyncio.sleep(0)
        if self._running:
            await asyncio.wait(set(self._running), timeout=STOP_GRACE_S)
        if self._running:
            self._cancelled |= self._running
            await cancel(*self._running)
        scheduler.shutdown(wait=False)
        # AsyncIOScheduler shuts down (and cancels its timer) on the next loop iteration.
        await asyncio.sleep(0)
        log.info("monitor.stopped", host=self.host)
