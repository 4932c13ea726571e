"""The monitor: the hysteresis state machine, events from injected readings, the real psutil reader, the schedule."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs
from tuxpilot.agent import monitor as monitor_module
from tuxpilot.agent.config import CheckConfig, MonitorConfig
from tuxpilot.agent.monitor import Hysteresis, Monitor, Reading, read_system, severity
from tuxpilot.protocol import schemas
from tuxpilot.protocol.models import DiskUsage, Event, Metrics, Usage

GB = 1024**3
HOST = "test-host"


def usage(percent: float, total: int = 16 * GB) -> Usage:
    used = int(total * percent / 100)
    return Usage(total=total, used=used, available=total - used, percent=percent)


def disk(mountpoint: str, percent: float, total: int = 100 * GB) -> DiskUsage:
    used = int(total * percent / 100)
    return DiskUsage(
        mountpoint=mountpoint, device="/dev/vdb", fstype="ext4", total=total, used=used,
        available=total - used, percent=percent,
    )  # fmt: skip


def reading(
    memory: float = 40.0,
    swap: float = 0.0,
    cpu: float = 10.0,
    load1: float = 0.5,
    cpus: int = 4,
    disks: dict[str, float] | None = None,
) -> Reading:
    return Reading(
        memory=usage(memory),
        swap=usage(swap, total=4 * GB),
        cpu_percent=cpu,
        cpu_count=cpus,
        load=(load1, load1, load1),
        disks=tuple(disk(m, p) for m, p in (disks if disks is not None else {"/": 30.0}).items()),
        uptime_s=1234.0,
    )


def quiet_config(**overrides: CheckConfig) -> MonitorConfig:
    """Every check without sustain time, so one reading decides; defaults' thresholds otherwise."""
    checks = {
        "memory": CheckConfig(threshold=90.0, clear=85.0),
        "swap": CheckConfig(threshold=80.0, clear=70.0),
        "disk": CheckConfig(threshold=90.0, clear=85.0),
        "cpu": CheckConfig(threshold=90.0, clear=80.0),
        "load": CheckConfig(threshold=2.0, clear=1.5),
    }
    checks.update(overrides)
    return MonitorConfig.model_validate({"event_ttl_s": 120.0, **checks})


class Recorder:
    """The publish callbacks: what was published, and optionally failing the first `fail` events."""

    def __init__(self, fail: int = 0) -> None:
        self.events: list[Event] = []
        self.metrics: list[Metrics] = []
        self.fail = fail
        self.changed = asyncio.Event()

    async def event(self, event: Event) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("bus down")
        self.events.append(event)
        self.changed.set()

    async def snapshot(self, metrics: Metrics) -> None:
        self.metrics.append(metrics)
        self.changed.set()


class Readings:
    """A reader returning `current`, which a test changes between ticks."""

    def __init__(self, first: Reading) -> None:
        self.current = first
        self.calls = 0
        self.changed = asyncio.Event()

    def __call__(self) -> Reading:
        self.calls += 1
        self.changed.set()
        return self.current


def monitor(config: MonitorConfig | None = None, first: Reading | None = None) -> tuple[Monitor, Readings, Recorder]:
    readings = Readings(first or reading())
    recorder = Recorder()
    mon = Monitor(config or quiet_config(), HOST, recorder.event, recorder.snapshot, reader=readings)
    return mon, readings, recorder


def valid_event(event: Event) -> Event:
    schemas.validator("event").check(event.to_doc())
    return event


# -- the state machine --------------------------------------------------------------------------------


def test_fires_once_after_sustain_and_not_again_while_high() -> None:
    h = Hysteresis(threshold=90, clear=85, sustain_s=30)
    assert h.update(95, now=0) is None
    assert h.update(95, now=29.9) is None
    assert h.update(95, now=30) == "fire"
    assert h.firing
    assert [h.update(99, now=t) for t in range(31, 100)] == [None] * 69


def test_clears_only_below_clear_level() -> None:
    h = Hysteresis(threshold=90, clear=85)
    assert h.update(90, now=0) == "fire"
    assert h.update(89, now=1) is None
    assert h.update(85, now=2) is None
    assert h.firing
    assert h.update(84.9, now=3) == "clear"
    assert not h.firing
    assert h.update(50, now=4) is None


def test_rearms_after_clear_and_waits_for_sustain_again() -> None:
    h = Hysteresis(threshold=90, clear=85, sustain_s=10)
    assert h.update(95, now=0) is None
    assert h.update(95, now=10) == "fire"
    assert h.update(80, now=11) == "clear"
    assert h.update(95, now=12) is None
    assert h.update(95, now=21.9) is None
    assert h.update(95, now=22) == "fire"


def test_sustain_restarts_when_the_value_drops_below_threshold() -> None:
    h = Hysteresis(threshold=90, clear=85, sustain_s=10)
    assert h.update(95, now=0) is None
    assert h.update(88, now=5) is None  # between clear and threshold still interrupts the wait
    assert h.update(95, now=9) is None
    assert h.update(95, now=18.9) is None
    assert h.update(95, now=19) == "fire"


def test_no_sustain_fires_on_first_reading_and_equal_levels_flip() -> None:
    h = Hysteresis(threshold=50, clear=50)
    assert h.update(50, now=0) == "fire"
    assert h.update(49.9, now=1) == "clear"
    assert h.update(50, now=2) == "fire"


def test_non_finite_readings_are_ignored() -> None:
    h = Hysteresis(threshold=90, clear=85, sustain_s=10)
    assert h.update(95, now=0) is None
    assert h.update(math.nan, now=5) is None
    assert h.update(math.inf, now=6) is None
    assert h.update(95, now=10) == "fire"
    assert h.update(math.nan, now=11) is None
    assert h.firing


def test_clear_above_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="clear"):
        Hysteresis(threshold=80, clear=90)


def test_severity() -> None:
    assert severity(90, 90, 100.0) == "warning"
    assert severity(94.9, 90, 100.0) == "warning"
    assert severity(95, 90, 100.0) == "critical"
    assert severity(3.9, 2.0, None) == "warning"
    assert severity(4.0, 2.0, None) == "critical"


# -- events from readings ------------------------------------------------------------------------------


async def test_memory_high_stays_then_ok() -> None:
    mon, readings, recorder = monitor(first=reading(memory=92))
    events = await mon.tick(now=0)
    assert len(events) == 1
    ev = valid_event(events[0])
    assert ev.type == "memory.high"
    assert (ev.host, ev.source, ev.severity, ev.unit, ev.resource) == (HOST, "monitor", "warning", "%", None)
    assert (ev.value, ev.threshold, ev.ttl) == (92, 90, 120)
    assert ev.data == {"total": 16 * GB, "used": int(16 * GB * 0.92), "available": 16 * GB - int(16 * GB * 0.92)}
    assert recorder.events == events

    assert await mon.tick(now=10) == []
    readings.current = reading(memory=87)
    assert await mon.tick(now=20) == []

    readings.current = reading(memory=80)
    (ok,) = await mon.tick(now=30)
    valid_event(ok)
    assert (ok.type, ok.severity, ok.value, ok.threshold) == ("memory.ok", "info", 80, 85)
    assert [e.type for e in recorder.events] == ["memory.high", "memory.ok"]


async def test_critical_severity_far_above_threshold() -> None:
    mon, _, _ = monitor(first=reading(memory=97))
    (ev,) = await mon.tick(now=0)
    assert ev.severity == "critical"


async def test_default_sustain_delays_memory_event() -> None:
    mon, _, _ = monitor(config=MonitorConfig(), first=reading(memory=95))
    assert mon.evaluate(reading(memory=95), now=0) == []
    assert mon.evaluate(reading(memory=95), now=29) == []
    assert [e.type for e in mon.evaluate(reading(memory=95), now=30)] == ["memory.high"]


async def test_every_check_fires_and_clears() -> None:
    mon, _, _ = monitor()
    high = reading(memory=95, swap=85, cpu=95, load1=12, cpus=4, disks={"/": 95})
    fired = mon.evaluate(high, now=0)
    assert sorted(e.type for e in fired) == ["cpu.high", "disk.low", "load.high", "memory.high", "swap.high"]
    for ev in fired:
        valid_event(ev)
    assert mon.evaluate(high, now=1) == []
    cleared = mon.evaluate(reading(disks={"/": 10}), now=2)
    assert sorted(e.type for e in cleared) == ["cpu.ok", "disk.ok", "load.ok", "memory.ok", "swap.ok"]
    assert {e.severity for e in cleared} == {"info"}


async def test_disks_are_tracked_per_mountpoint() -> None:
    mon, _, _ = monitor()
    (low,) = mon.evaluate(reading(disks={"/": 95, "/data": 50}), now=0)
    valid_event(low)
    assert (low.type, low.resource, low.value, low.threshold, low.unit) == ("disk.low", "/", 95, 90, "%")
    assert low.data["total"] == 100 * GB
    assert low.data["available"] == 5 * GB
    assert (low.data["device"], low.data["fstype"]) == ("/dev/vdb", "ext4")

    (data_low,) = mon.evaluate(reading(disks={"/": 95, "/data": 93}), now=1)
    assert (data_low.type, data_low.resource) == ("disk.low", "/data")

    (root_ok,) = mon.evaluate(reading(disks={"/": 50, "/data": 93}), now=2)
    assert (root_ok.type, root_ok.resource, root_ok.severity) == ("disk.ok", "/", "info")


async def test_vanished_mount_drops_its_state() -> None:
    mon, _, _ = monitor()
    assert [e.resource for e in mon.evaluate(reading(disks={"/": 30, "/mnt/usb": 99}), now=0)] == ["/mnt/usb"]
    assert mon.evaluate(reading(disks={"/": 30}), now=1) == []
    # Back with the same usage: a new mount as far as the monitor knows, so it fires again.
    assert [e.resource for e in mon.evaluate(reading(disks={"/": 30, "/mnt/usb": 99}), now=2)] == ["/mnt/usb"]


async def test_load_is_compared_per_core() -> None:
    mon, _, _ = monitor()
    assert mon.evaluate(reading(load1=6.0, cpus=4), now=0) == []  # 1.5 per core
    (ev,) = mon.evaluate(reading(load1=10.0, cpus=4), now=1)
    valid_event(ev)
    assert (ev.type, ev.value, ev.threshold, ev.unit, ev.severity) == ("load.high", 2.5, 2.0, "load/core", "warning")
    assert ev.data == {"load": [10.0, 10.0, 10.0], "cpu_count": 4}
    assert mon.evaluate(reading(load1=7.0, cpus=4), now=2) == []  # 1.75: between clear and threshold
    (ok,) = mon.evaluate(reading(load1=5.0, cpus=4), now=3)
    assert (ok.type, ok.value, ok.threshold) == ("load.ok", 1.25, 1.5)

    mon2, _, _ = monitor()
    (crit,) = mon2.evaluate(reading(load1=16.0, cpus=4), now=0)
    assert crit.severity == "critical"


async def test_disabled_checks_never_fire() -> None:
    off = CheckConfig(enabled=False, threshold=1.0, clear=0.5)
    mon, _, _ = monitor(config=quiet_config(memory=off, disk=off))
    assert mon.evaluate(reading(memory=100, disks={"/": 100}), now=0) == []


async def test_publish_failure_is_logged_and_the_rest_still_published() -> None:
    mon, _, recorder = monitor(first=reading(memory=95, cpu=95))
    recorder.fail = 1
    with capture_logs() as logs:
        events = await mon.tick(now=0)
    assert len(events) == 2
    assert recorder.events == events[1:]
    failed = [entry for entry in logs if entry["event"] == "monitor.publish_failed"]
    assert len(failed) == 1
    assert failed[0]["type"] == events[0].type
    assert failed[0]["log_level"] == "error"
    assert [entry["type"] for entry in logs if entry["event"] == "monitor.event"] == [e.type for e in events]


async def test_snapshot_reuses_the_latest_reading_and_validates() -> None:
    mon, readings, recorder = monitor(first=reading(memory=42, disks={"/": 30, "/home": 70}))
    await mon.tick(now=0)
    metrics = await mon.publish_snapshot()
    assert readings.calls == 1
    assert recorder.metrics == [metrics]
    doc = metrics.to_doc()
    schemas.validator("metrics").check(doc)
    assert doc["host"] == HOST
    assert doc["memory"]["percent"] == 42
    assert [d["mountpoint"] for d in doc["disks"]] == ["/", "/home"]
    assert doc["load"] == [0.5, 0.5, 0.5]


async def test_snapshot_before_any_check_reads() -> None:
    mon, readings, _ = monitor()
    metrics = await mon.publish_snapshot()
    assert readings.calls == 1
    schemas.validator("metrics").check(metrics.to_doc())


# -- the real machine ----------------------------------------------------------------------------------


def test_read_system_reads_plausible_figures() -> None:
    config = MonitorConfig()
    r = read_system(config)
    assert r.memory.total > 0
    assert 0 <= r.memory.percent <= 100
    assert r.memory.used <= r.memory.total
    assert 0 <= r.swap.percent <= 100
    assert 0 <= r.cpu_percent <= 100
    assert r.cpu_count >= 1
    assert len(r.load) == 3
    assert all(x >= 0 for x in r.load)
    assert r.load_per_core == pytest.approx(r.load[0] / r.cpu_count)
    assert r.uptime_s is not None
    assert r.uptime_s >= 0
    mountpoints = [d.mountpoint for d in r.disks]
    assert len(mountpoints) == len(set(mountpoints))
    for d in r.disks:
        assert d.fstype not in config.ignore_fstypes
        assert d.total > 0
        assert 0 <= d.percent <= 100
    schemas.validator("metrics").check(r.to_metrics(HOST).to_doc())

    # The real reading goes through the same evaluation as injected ones.
    mon = Monitor(config, HOST, Recorder().event, Recorder().snapshot)
    for ev in mon.evaluate(r, now=0):
        valid_event(ev)


def test_read_system_skips_ignored_filesystems() -> None:
    everything = read_system(MonitorConfig(ignore_fstypes=[]))
    if not everything.disks:
        pytest.skip("no real mounts visible")
    skip = everything.disks[0].fstype
    assert skip is not None
    fewer = read_system(MonitorConfig(ignore_fstypes=[skip]))
    assert all(d.fstype != skip for d in fewer.disks)


# -- the schedule --------------------------------------------------------------------------------------


async def until(changed: asyncio.Event, condition: Callable[[], bool]) -> None:
    """Wait, up to five seconds, until `condition` holds, looking again each time `changed` is set."""
    async with asyncio.timeout(5):
        while not condition():
            changed.clear()
            await changed.wait()


async def test_start_runs_checks_on_schedule_and_stops_cleanly() -> None:
    config = quiet_config().model_copy(update={"interval_s": 0.05, "metrics_interval_s": 0.05})
    mon, readings, recorder = monitor(config=config, first=reading(memory=95))
    await mon.start()
    assert mon.first_check_done.is_set()
    assert [e.type for e in recorder.events] == ["memory.high"]
    assert len(recorder.metrics) == 1

    await until(readings.changed, lambda: readings.calls >= 5)
    assert [e.type for e in recorder.events] == ["memory.high"]  # still high: no repeat

    readings.current = reading(memory=50)
    await until(recorder.changed, lambda: len(recorder.events) == 2)
    assert recorder.events[1].type == "memory.ok"
    await until(recorder.changed, lambda: len(recorder.metrics) >= 3)

    await mon.stop()
    calls = readings.calls
    await asyncio.sleep(0.2)
    assert readings.calls == calls
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await mon.stop()  # twice is harmless


async def test_scheduled_check_survives_a_failing_reader() -> None:
    config = quiet_config().model_copy(update={"interval_s": 0.05, "metrics_interval_s": 60.0})
    readings = Readings(reading(cpu=99))
    failures = 2  # the first check and the first snapshot

    def flaky() -> Reading:
        nonlocal failures
        if failures > 0:
            failures -= 1
            raise OSError("proc unreadable")
        return readings()

    recorder = Recorder()
    mon = Monitor(config, HOST, recorder.event, recorder.snapshot, reader=flaky)
    with capture_logs() as logs:
        await mon.start()
        assert mon.first_check_done.is_set()
        assert recorder.events == []
        await until(recorder.changed, lambda: bool(recorder.events))
        await mon.stop()
    assert [e.type for e in recorder.events] == ["cpu.high"]
    assert sum(1 for entry in logs if entry["event"] == "monitor.job_failed") == 2
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_stop_without_start() -> None:
    mon, _, _ = monitor()
    await mon.stop()


async def test_stop_cancels_a_run_stuck_in_publish(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(monitor_module, "STOP_GRACE_S", 0.1)
    config = quiet_config().model_copy(update={"interval_s": 0.05, "metrics_interval_s": 60.0})
    readings = Readings(reading())
    stuck = asyncio.Event()

    async def hanging_publish(event: Event) -> None:
        stuck.set()
        await asyncio.Event().wait()

    mon = Monitor(config, HOST, hanging_publish, Recorder().snapshot, reader=readings)
    with capture_logs() as logs:
        await mon.start()
        readings.current = reading(memory=99)
        async with asyncio.timeout(5):
            await stuck.wait()
        await mon.stop()
    assert [entry["job"] for entry in logs if entry["event"] == "monitor.job_cancelled"] == ["check"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert asyncio.all_tasks() == {asyncio.current_task()}
