"""The benchmark: the TuxPilot pipeline against the bare bus, measured side by side on one server.

Three runs with the same hop structure, the same events and the same number of them in flight:

- the floor: plain nats-py on core NATS, no validation, no TuxPilot code. An event is published, a
  peer process publishes a proposal, a "gate" subscriber requests the action, the peer replies, the
  result is published;
- the durable floor: the same in plain nats-py, with the pipeline's durability: events and proposals
  stored in streams and pulled, the action id claimed by a KV create, the result stored;
- the pipeline: the real gate (with its registry and ledger) in this process and the `noop` plugin
  as a real SDK process, as the agent runs them: event (JetStream) → the plugin proposes (JetStream)
  → the gate checks schema and permission and claims the action id (KV) → the plugin executes →
  the result (JetStream).

Each event is timed from its publish to its result, and each process's CPU time is divided by the
events. Then `tuxpilot up` is started as a user starts it, to time its readiness (its first line
comes after the monitor's first check) and to read its memory and, on request, its CPU when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import nats
import psutil
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from tuxpilot.agent.config import Config, handoff_timeout_s
from tuxpilot.agent.gate import Gate
from tuxpilot.agent.registry import Registry
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer
from tuxpilot.log import setup as setup_logging
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, new_id, now
from tuxpilot.protocol.names import Names, Subjects
from tuxpilot.protocol.resources import shipped
from tuxpilot.runtimes.host import PluginHost, plugin_command

BENCH_PLUGIN, BENCH_ACTION, BENCH_EVENT, BENCH_HOST = "noop", "echo", "bench.tick", "bench"


def bench_plugin_dir() -> Path:
    """The `noop` plugin's folder: the bench's own, not among the built-in plugins a host lists or runs."""
    return shipped("benchmarks") / BENCH_PLUGIN
BENCH_ID = "Bench-Id"  # the durable floor's correlation header: an event's id, carried hop to hop
IDLE_S = 30.0
SETTLE_S = 2.0  # after `up` is ready, before its memory and CPU are read: its plugins are starting
STALL_S = 15.0  # a run gives up when no result has come for this long
LINGER_S = 0.3  # after the last expected result, how long to watch for a second one
READY_TIMEOUT_S = 30.0

RUNS = ("floor", "durable_floor", "pipeline")
Progress = Callable[[int, int | None], None]  # (done, total); total None: under way, size unknown


# -- measuring one run ---------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Figures:
    """One measured run."""

    events: int
    results: int
    ok: int
    duplicates: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU time per event, by process

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)

        def ms(q: float) -> float | None:
            found = percentile(ordered, q)
            return None if found is None else round(found, 3)

        return {
            "events": self.events,
            "results": self.results,
            "ok": self.ok,
            "duplicates": self.duplicates,
            "seconds": round(self.seconds, 3),
            "throughput_eps": round(self.results / self.seconds, 1) if self.seconds > 0 else None,
            "p50_ms": ms(50),
            "p90_ms": ms(90),
            "p99_ms": ms(99),
            "max_ms": ms(100),
            "cpu_us_per_event": self.cpu_us,
        }


class Tracker:
    """Keeps at most `in_flight` events outstanding and times each from its publish to its result.

    Events are numbered from `offset`; a result names its event's number.
    """

    def __init__(self, events: int, in_flight: int, offset: int = 0):
        self.events = events
        self.offset = offset
        self.sent_at = [0.0] * events
        self.latency_ms: list[float] = []
        self.seen = bytearray(events)
        self.results = self.ok = self.duplicates = self.strays = 0
        self.last = 0.0
        self._slots = asyncio.Semaphore(in_flight)
        self._done = asyncio.Event()

    def result(self, seq: int, ok: bool) -> None:
        at = time.perf_counter()
        i = seq - self.offset
        if not 0 <= i < self.events:
            self.strays += 1
            return
        if self.seen[i]:
            self.duplicates += 1
            return
        self.seen[i] = 1
        self.latency_ms.append((at - self.sent_at[i]) * 1000)
        self.results += 1
        self.ok += ok
        self.last = at
        self._slots.release()
        if self.results == self.events:
            self._done.set()

    async def run(self, send: Callable[[int], Awaitable[None]]) -> Figures:
        """Publish every event through `send(seq)`, at most `in_flight` ahead of the results."""
        started = time.perf_counter()
        for i in range(self.events):
            await self._slots.acquire()
            self.sent_at[i] = time.perf_counter()
            await send(i + self.offset)
        while not self._done.is_set():
            before = self.results
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), STALL_S)
            if self.results == before:
                break  # stalled: report what came
        await asyncio.sleep(LINGER_S)
        return Figures(
            self.events, self.results, self.ok, self.duplicates, max(self.last - started, 0.0), self.latency_ms
        )


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _measure(
    nc: Client, send: Callable[[int], Awaitable[None]], result_subject: str, *, status: bool, events: int,
    in_flight: int, warmup: int, procs: dict[str, int | None], progress: Progress | None,
) -> Figures:
    """A warm-up run (not counted), then the measured one; `procs` are the processes whose CPU counts.

    Results are routed by the sequence number they carry, read from `data.seq`; with `status`, only
    results whose status is `ok` count as executed.
    """
    current: Tracker | None = None

    async def on_result(msg: Msg) -> None:
        if current is not None:
            doc = json.loads(msg.data)
            current.result(int(doc["data"]["seq"]), doc["status"] == "ok" if status else True)

    sub = await nc.subscribe(result_subject, cb=on_result)
    await nc.flush()
    try:
        if warmup:
            current = Tracker(warmup, in_flight)
            await current.run(send)
        current = tracker = Tracker(events, in_flight, offset=warmup)
        ticker = asyncio.create_task(_report_progress(tracker, progress)) if progress else None
        watched = {name: psutil.Process(pid) for name, pid in procs.items() if pid is not None}
        before = {name: _cpu_s(p) for name, p in watched.items()}
        try:
            figures = await tracker.run(send)
        finally:
            if ticker is not None:
                ticker.cancel()
                progress(tracker.results, tracker.events)  # type: ignore[misc]
        if figures.results:
            figures.cpu_us = {
                name: round((_cpu_s(p) - before[name]) / figures.results * 1e6, 1) for name, p in watched.items()
            }
        return figures
    finally:
        await sub.unsubscribe()


async def _report_progress(tracker: Tracker, progress: Progress) -> None:
    while True:
        progress(tracker.results, tracker.events)
        await asyncio.sleep(0.1)


def event_doc(seq: int, host: str) -> bytes:
    """One bench.tick event; its resource is its own, so no two share a cooldown slot."""
    return Event(
        id=new_id(), type=BENCH_EVENT, host=host, time=now(), severity="info", source="bench",
        value=float(seq), resource=f"tick-{seq}", data={"seq": seq},
    ).to_json()


# -- the floors: plain nats-py ---------------------------------------------------------------------
#
# The bus floor uses core NATS only. The durable floor makes the pipeline's durable hops in plain
# nats-py: events and proposals stored in streams and pulled, the action id claimed with a KV create,
# the result stored; so the gap between the two floors is the price of durability, and the gap from
# the durable floor to the pipeline is TuxPilot's own.


Handler = Callable[[Msg], Coroutine[Any, Any, None]]


async def _pull_each(js: JetStreamContext, stream: str, subject: str, handle: Handler) -> None:
    """Pull `stream` through a durable consumer for ever, each message handled in its own task."""
    await js.add_consumer(stream, ConsumerConfig(durable_name="bench", filter_subject=subject,
                                                 ack_policy=AckPolicy.EXPLICIT, max_ack_pending=4096))
    sub = await js.pull_subscribe_bind(durable="bench", stream=stream)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        with contextlib.suppress(NatsTimeout):
            for msg in await sub.fetch(256, timeout=1.0):
                task = asyncio.create_task(handle(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


def _floor_stream(prefix: str, hop: str) -> str:
    return f"{prefix}-{hop}"


def _bench_id(msg: Msg) -> str:
    return (msg.headers or {}).get(BENCH_ID, "")


async def floor_peer(url: str, prefix: str, durable: bool) -> None:
    """The plugin's side of a floor, in a process of its own: propose on each event, answer each request."""
    nc = await nats.connect(url, name="bench-floor-peer")
    js = nc.jetstream()

    async def propose(msg: Msg) -> None:
        if durable:
            bid = _bench_id(msg)
            await js.publish(f"{prefix}.proposal", msg.data, headers={BENCH_ID: bid, "Nats-Msg-Id": f"{bid}-p"})
            await msg.ack()
        else:
            await nc.publish(f"{prefix}.proposal", msg.data)

    async def execute(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(f"{prefix}.act", cb=execute)
    if durable:
        pulling = asyncio.create_task(_pull_each(js, _floor_stream(prefix, "evt"), f"{prefix}.evt", propose))
    else:
        await nc.subscribe(f"{prefix}.evt", cb=propose)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the bench closes our stdin
    if durable:
        pulling.cancel()
    await nc.drain()


async def run_floor(url: str, events: int, in_flight: int, warmup: int, *, durable: bool = False,
                    server_pid: int | None = None, progress: Progress | None = None) -> Figures:
    prefix = f"bench-floor-{new_id()[:8]}"
    gate = await nats.connect(url, name="bench-floor-gate")
    client = await nats.connect(url, name="bench-floor-client")
    js = gate.jetstream()
    hops = ("evt", "proposal", "result")
    if durable:
        for hop in hops:
            await js.add_stream(StreamConfig(name=_floor_stream(prefix, hop), subjects=[f"{prefix}.{hop}"]))
        claims = await js.create_key_value(bucket=_floor_stream(prefix, "claims"))
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tuxpilot.bench", "floor-peer", url, prefix, "durable" if durable else "core",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    tasks: set[asyncio.Task[None]] = set()

    async def decide(msg: Msg) -> None:
        if not durable:
            reply = await gate.request(f"{prefix}.act", msg.data, timeout=10)
            await gate.publish(f"{prefix}.result", reply.data)
            return
        bid = _bench_id(msg)
        await claims.create(bid, b"started")
        reply = await gate.request(f"{prefix}.act", msg.data, timeout=10, headers={BENCH_ID: bid})
        await js.publish(f"{prefix}.result", reply.data, headers={"Nats-Msg-Id": f"{bid}-r"})
        await msg.ack()

    async def on_proposal(msg: Msg) -> None:
        # As the gate does: each proposal in its own task, so one request never holds up the next.
        task = asyncio.create_task(decide(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    pulling = None
    try:
        assert peer.stdout is not None
        ready = await asyncio.wait_for(peer.stdout.readline(), READY_TIMEOUT_S)
        if ready.strip() != b"ready":
            raise RuntimeError("the floor's peer process did not start")
        if durable:
            stream = _floor_stream(prefix, "proposal")
            pulling = asyncio.create_task(_pull_each(js, stream, f"{prefix}.proposal", decide))
        else:
            await gate.subscribe(f"{prefix}.proposal", cb=on_proposal)
        await gate.flush()
        payloads = [event_doc(seq, BENCH_HOST) for seq in range(warmup + events)]

        async def send(seq: int) -> None:
            # The bus floor carries nothing but the event; the durable one its id, as the pipeline does.
            headers = {BENCH_ID: f"tick-{seq}", "Nats-Msg-Id": f"tick-{seq}"} if durable else None
            await client.publish(f"{prefix}.evt", payloads[seq], headers=headers)

        return await _measure(
            client, send, f"{prefix}.result", status=False, events=events, in_flight=in_flight, warmup=warmup,
            procs={"bench": os.getpid(), "peer": peer.pid, "server": server_pid}, progress=progress,
        )
    finally:
        if pulling is not None:
            pulling.cancel()
        assert peer.stdin is not None
        peer.stdin.close()  # the peer's signal to stop
        await _ended(peer)
        if durable:
            for name in (*(_floor_stream(prefix, hop) for hop in hops), f"KV_{_floor_stream(prefix, 'claims')}"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
        await client.close()
        await gate.close()


# -- the pipeline: the real gate and a real plugin process -------------------------------------------


def pipeline_config(base: Config, url: str, state_dir: Path, prefix: str, in_flight: int) -> Config:
    """The host's configuration for the run: its own subjects, every action executed, no cooldown.

    The per-plugin in-flight limit is raised above the events in flight: at the limit the gate makes
    a plugin's proposals wait (back-pressure), and the bench would measure that wait.
    """
    gate = base.gate.model_copy(
        update={
            "dry_run": False, "dry_run_actions": [], "cooldown_s": 0.0, "cooldowns": {},
            "max_in_flight_per_plugin": max(base.gate.max_in_flight_per_plugin, 2 * in_flight),
            "max_concurrency": max(base.gate.max_concurrency, in_flight),
            "proposal_rate": 0,  # the run is a flood of proposals on purpose
        }
    )
    plugins = {k: v for k, v in base.plugins.items() if k != BENCH_PLUGIN}  # its default grants
    return base.model_copy(
        update={
            "host_id": BENCH_HOST, "subject_prefix": prefix, "state_dir": state_dir,
            "nats": base.nats.model_copy(update={"url": url}), "gate": gate, "plugins": plugins,
        }
    )


def plugin_env(config: Config, folder: Path) -> dict[str, str]:
    """The plugin process's environment, exactly as the agent's plugin host gives it."""
    host = PluginHost(config, config.nats.url or "", {BENCH_PLUGIN: (folder, load_manifest(folder))},
                      handoff_timeout_s=functools.partial(handoff_timeout_s, config))
    return host.environment(host.plugins[BENCH_PLUGIN])


async def _ended(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    """Wait for a child that was told to stop; kill it if it does not."""
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _until_serving(nc: Client, config: Config, registry: Registry, plugin: asyncio.subprocess.Process) -> None:
    """Until the plugin serves its action and has its events consumer."""
    subjects = Subjects.of(config)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if plugin.returncode is not None:
            raise RuntimeError(f"the {BENCH_PLUGIN} plugin exited with code {plugin.returncode}")
        with contextlib.suppress(Exception):
            if registry.get(BENCH_PLUGIN) is not None:
                await nc.request(f"$SRV.PING.{BENCH_PLUGIN}", b"", timeout=0.5)
                await nc.jetstream().consumer_info(Names.of(subjects).events, f"{BENCH_PLUGIN}-{subjects.host}")
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the {BENCH_PLUGIN} plugin was not serving within {READY_TIMEOUT_S:.0f} s")


class _LogFile:
    """Where the gate's logs go during the run; once closed, what still comes goes to stderr."""

    def __init__(self, path: Path):
        self._file: TextIO | None = path.open("w")

    def write(self, text: str) -> int:
        return (self._file or sys.stderr).write(text)

    def flush(self) -> None:
        (self._file or sys.stderr).flush()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


@contextlib.contextmanager
def _logs_to(path: Path, config: Config) -> Iterator[None]:
    """The gate logs at the host's level, as the agent does, into a file instead of the terminal."""
    sink = _LogFile(path)
    setup_logging(config.log.level, config.log.format, colors=False)  # a file, as a service's journal
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sink))  # type: ignore[arg-type]
    try:
        yield
    finally:
        setup_logging(config.log.level, config.log.format)
        sink.close()


async def run_pipeline(base: Config, url: str, state_dir: Path, events: int, in_flight: int, warmup: int, *,
                       server_pid: int | None = None, progress: Progress | None = None) -> Figures:
    config = pipeline_config(base, url, state_dir, f"tpbench-{new_id()[:8]}", in_flight)
    subjects = Subjects.of(config)
    folder = bench_plugin_dir()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    with (state_dir / f"{BENCH_PLUGIN}.log").open("wb") as plugin_log, _logs_to(state_dir / "gate.log", config):
        plugin = await asyncio.create_subprocess_exec(
            *plugin_command(folder, load_manifest(folder)), env=plugin_env(config, folder),
            stdin=subprocess.DEVNULL, stdout=plugin_log, stderr=plugin_log,
        )
        nc = await bus.connect(config.nats, url, name="tuxpilot-bench-agent")
        client = await bus.connect(config.nats, url, name="tuxpilot-bench-client")
        registry = Registry(nc, subjects, {BENCH_PLUGIN: load_manifest(folder)})
        gate = Gate(nc, config, registry)
        try:
            await registry.start()
            await gate.start()
            await _until_serving(nc, config, registry, plugin)
            payloads = [event_doc(seq, subjects.host) for seq in range(warmup + events)]
            subject = subjects.event(BENCH_EVENT)

            async def send(seq: int) -> None:
                # The monitor's publish without waiting for each store's ack: the stream still
                # stores the event (deduplicated by its id) before any consumer sees it.
                await client.publish(subject, payloads[seq], headers={"Nats-Msg-Id": f"tick-{seq}"})

            return await _measure(
                client, send, subjects.result(BENCH_PLUGIN, BENCH_ACTION), status=True, events=events,
                in_flight=in_flight, warmup=warmup, progress=progress,
                procs={"bench": os.getpid(), "plugin": plugin.pid, "server": server_pid},
            )
        finally:
            await gate.stop()
            await registry.stop()
            with contextlib.suppress(ProcessLookupError):
                plugin.terminate()
            await _ended(plugin)
            await _forget(nc, subjects)
            await client.close()
            await nc.close()


async def _forget(nc: Client, subjects: Subjects) -> None:
    """Delete the run's streams and buckets (on a shared server they would stay)."""
    js = nc.jetstream()
    names = Names.of(subjects)
    for stream in (names.events, names.proposals, names.audit):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    for bucket in (names.executions, names.cooldowns, names.plugins):
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)


# -- the agent as a user starts it ---------------------------------------------------------------


@dataclass
class AgentFigures:
    ready_s: float | None = None
    rss_mb: float | None = None
    uss_mb: float | None = None  # its private memory: RSS less the library pages all TuxPilot processes share
    idle_cpu_pct: float | None = None
    server: dict[str, float | None] | None = None  # the embedded nats-server `up` started
    plugins: dict[str, dict[str, float | None]] = field(default_factory=dict)  # by plugin name

    def _total(self, key: str) -> float | None:
        parts = [self.rss_mb if key == "rss_mb" else self.uss_mb if key == "uss_mb" else self.idle_cpu_pct]
        parts += [kid.get(key) for kid in (self.server or {key: None}, *self.plugins.values())]
        return None if any(v is None for v in parts) else round(sum(v for v in parts if v is not None), 3)

    def summary(self) -> dict[str, Any]:
        # The totals are the default install's footprint on a host: agent, its server, its plugins.
        # RSS counts the library pages they share once per process (what `ps` shows); USS does not.
        return {"rss_mb": self.rss_mb, "uss_mb": self.uss_mb, "idle_cpu_pct": self.idle_cpu_pct,
                "ready_s": self.ready_s, "server": self.server, "plugins": self.plugins,
                "total_rss_mb": self._total("rss_mb"), "total_uss_mb": self._total("uss_mb"),
                "total_idle_cpu_pct": self._total("idle_cpu_pct")}


def measure_agent(state_dir: Path, idle_s: float | None = None) -> AgentFigures:
    """Start `tuxpilot up` on a fresh state dir with the default config: time its first line, then
    read the agent process's RSS and, with `idle_s`, its CPU use over that many idle seconds.

    `up` prints its first line once the agent has started, which includes the monitor's first check.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "tuxpilot.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    env.update(TUXPILOT_STATE_DIR=str(state_dir), TUXPILOT_HOST_ID="bench-up",
               TUXPILOT_CONFIG=str(state_dir / "tuxpilot.toml"))
    figures = AgentFigures()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuxpilot.cli", "up"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline():
            return figures
        figures.ready_s = round(time.perf_counter() - started, 3)
        # `up` prints the bus traffic: keep reading, or a full pipe would stop it.
        threading.Thread(target=proc.stdout.read, daemon=True, name="bench-up-stdout").start()
        agent = psutil.Process(proc.pid)
        time.sleep(SETTLE_S)
        kids = {p.pid: (p, _cpu_s(p)) for p in agent.children(recursive=True)}
        cpu, wall = _cpu_s(agent), time.perf_counter()
        time.sleep(idle_s or 0)
        elapsed = time.perf_counter() - wall
        if idle_s:
            figures.idle_cpu_pct = round((_cpu_s(agent) - cpu) / elapsed * 100, 3)
        memory = agent.memory_full_info()
        figures.rss_mb, figures.uss_mb = round(memory.rss / 2**20, 1), round(memory.uss / 2**20, 1)
        for p, before in kids.values():
            with contextlib.suppress(psutil.Error):
                kid = p.memory_full_info()
                found: dict[str, float | None] = {
                    "rss_mb": round(kid.rss / 2**20, 1),
                    "uss_mb": round(kid.uss / 2**20, 1),
                    "idle_cpu_pct": round((_cpu_s(p) - before) / elapsed * 100, 3) if idle_s else None,
                }
                if "nats-server" in p.name():
                    figures.server = found
                else:  # `up` starts nothing else but its plugins
                    figures.plugins[_plugin_of(p)] = found
        return figures
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _plugin_of(p: psutil.Process) -> str:
    """The plugin a child of `up` runs: the folder its command line ends with."""
    cmd = p.cmdline()
    return Path(cmd[-1]).name if cmd else p.name()


# -- the whole bench -----------------------------------------------------------------------------


@dataclass
class Report:
    floor: Figures
    durable_floor: Figures
    pipeline: Figures
    agent: AgentFigures
    settings: dict[str, Any]

    def to_doc(self) -> dict[str, Any]:
        floor, durable, pipeline = self.floor.summary(), self.durable_floor.summary(), self.pipeline.summary()

        def ratio(key: str, base: dict[str, Any]) -> float | None:
            a, b = pipeline[key], base[key]
            return round(a / b, 3) if a is not None and b else None

        return {
            "floor": floor,
            "durable_floor": durable,
            "pipeline": pipeline,
            "ratio": {
                "throughput": ratio("throughput_eps", floor), "p50": ratio("p50_ms", floor),
                "p99": ratio("p99_ms", floor),
                "throughput_vs_durable_floor": ratio("throughput_eps", durable),
                "p50_vs_durable_floor": ratio("p50_ms", durable),
            },
            "agent": self.agent.summary(),
            "settings": self.settings,
        }


@contextlib.contextmanager
def _server(url: str | None, state_dir: Path) -> Iterator[tuple[str, int | None]]:
    if url:
        yield url, None
        return
    with NatsServer(state_dir / "nats") as server:
        yield server.url, server.pid


async def run_bench(
    base: Config, *, events: int, in_flight: int, warmup: int = 1_000, server: str | None = None,
    idle: bool = False, agent: bool = True, progress: Callable[[str, int, int | None], None] | None = None,
) -> Report:
    """The floor, then the pipeline, on one server; then `tuxpilot up` (with `agent`)."""

    def shown(name: str) -> Progress | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    with tempfile.TemporaryDirectory(prefix="tuxpilot-bench-") as tmp:
        state = Path(tmp)
        with _server(server, state) as (url, pid):
            floor = await run_floor(url, events, in_flight, warmup, server_pid=pid, progress=shown("floor"))
            durable = await run_floor(url, events, in_flight, warmup, durable=True, server_pid=pid,
                                      progress=shown("durable floor"))
            pipeline = await run_pipeline(base, url, state / "pipeline", events, in_flight, warmup,
                                          server_pid=pid, progress=shown("pipeline"))
        up = None
        if agent:
            if progress:
                progress("agent", 0, None)
            up = await asyncio.to_thread(measure_agent, state / "up", IDLE_S if idle else None)
            if progress:
                progress("agent", 1, 1)
    settings = {
        "events": events, "in_flight": in_flight, "warmup": warmup, "server": server or "embedded",
        "log_level": base.log.level, "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return Report(floor, durable, pipeline, up or AgentFigures(), settings)


def main(base: Config, *, events: int, in_flight: int, warmup: int, server: str | None, idle: bool,
         as_json: bool) -> int:
    """`tuxpilot bench`: run, print the table (or JSON); exit code 1 when an event lacks its one result."""
    report = asyncio.run(_run_shown(base, sys.stdout.isatty() and not as_json, events=events,
                                    in_flight=in_flight, warmup=warmup, server=server, idle=idle))
    doc = report.to_doc()
    if as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        render(doc)
    # An event without its one result is a failure, not a figure.
    return 1 if any(doc[run]["results"] != events or doc[run]["duplicates"] for run in RUNS) else 0


async def _run_shown(base: Config, show: bool, **kw: Any) -> Report:
    """The bench, with a progress bar when `show`."""
    if not show:
        return await run_bench(base, **kw)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done, total=total)

        return await run_bench(base, progress=progress, **kw)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    s = doc["settings"]
    table = Table(
        "", "results", "events/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
        title=f"{s['events']:,} events, {s['in_flight']} in flight, {s['cpus']} CPUs, {s['server']} nats-server",
    )
    for name in RUNS:
        f = doc[name]
        table.add_row(name.replace("_", " "), f"{f['results']:,}/{f['events']:,}",
                      *(_cell(f[k]) for k in ("throughput_eps", "p50_ms", "p90_ms", "p99_ms", "max_ms")))
    r = doc["ratio"]
    table.add_row("pipeline/floor", "", _cell(r["throughput"]), _cell(r["p50"]), "", _cell(r["p99"]), "")
    table.add_row("pipeline/durable", "", _cell(r["throughput_vs_durable_floor"]), _cell(r["p50_vs_durable_floor"]),
                  "", "", "")
    out.print(table)
    for name in RUNS:
        cpu = ", ".join(f"{k} {v:,.0f}" for k, v in doc[name]["cpu_us_per_event"].items())
        out.print(f"CPU per event, {name.replace('_', ' ')}: {cpu} µs")
    a = doc["agent"]
    idle = f"{a['idle_cpu_pct']:.2f} % of a core" if a["idle_cpu_pct"] is not None else "not measured (--idle)"
    out.print(f"tuxpilot up: ready in {_cell(a['ready_s'])} s, agent RSS {_cell(a['rss_mb'])} MB "
              f"(private {_cell(a['uss_mb'])} MB), idle CPU {idle}")
    for name, kid in (("nats-server", a["server"]), *((f"plugin {k}", v) for k, v in a["plugins"].items())):
        if kid is not None:
            kid_idle = f", idle CPU {kid['idle_cpu_pct']:.2f} %" if kid["idle_cpu_pct"] is not None else ""
            out.print(f"  {name}: RSS {_cell(kid['rss_mb'])} MB (private {_cell(kid['uss_mb'])} MB){kid_idle}")
    total_idle = f", idle CPU {a['total_idle_cpu_pct']:.2f} %" if a["total_idle_cpu_pct"] is not None else ""
    out.print(f"  in all: RSS {_cell(a['total_rss_mb'])} MB (private {_cell(a['total_uss_mb'])} MB){total_idle}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["floor-peer"]:
        asyncio.run(floor_peer(sys.argv[2], sys.argv[3], sys.argv[4] == "durable"))
    else:
        sys.exit("usage: python -m tuxpilot.bench floor-peer URL PREFIX core|durable (the bench starts it)")
