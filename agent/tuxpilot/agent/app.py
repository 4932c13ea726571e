"""The agent process: starts its parts in order and stops them in reverse, through one exit stack.

embedded nats-server (when no URL is configured) → connection → outbox → dead letters → registry → gate →
monitor → plugin host → config watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from tuxpilot.agent import installed as packages
from tuxpilot.agent.automation import Automation
from tuxpilot.agent.config import Config, handoff_timeout_s, load_config
from tuxpilot.agent.fanout import FanOut
from tuxpilot.agent.gate import Gate
from tuxpilot.agent.handrun import HandRun
from tuxpilot.agent.heartbeat import Heartbeat
from tuxpilot.agent.installer import Installer
from tuxpilot.agent.lock import state_dir_lock
from tuxpilot.agent.monitor import Monitor, Reading
from tuxpilot.agent.outbox import Outbox
from tuxpilot.agent.registry import Registry
from tuxpilot.bus import auth
from tuxpilot.bus import connect as bus
from tuxpilot.bus.consumer import CHECK_EVERY_S
from tuxpilot.bus.plugin_state import forget_state, put_state, state_bucket
from tuxpilot.bus.registry import open_bucket
from tuxpilot.bus.server import NatsServer
from tuxpilot.bus.streams import (
    create_plugin_consumer,
    delete_plugin_consumer,
    ensure_streams,
    guard_plugin_consumers,
    replicas_for,
)
from tuxpilot.fleet import member
from tuxpilot.fleet.heartbeat import open_heartbeats
from tuxpilot.lifetime import cancel
from tuxpilot.protocol.errors import ConfigError, Unavailable
from tuxpilot.protocol.manifest import Manifest, builtin_dir
from tuxpilot.protocol.models import Event, Metrics, Result, now
from tuxpilot.protocol.names import Names, Subjects
from tuxpilot.protocol.plugin_state import PluginState
from tuxpilot.runtimes.host import PluginHost
from tuxpilot.runtimes.loader import Found, Installed, installed
from tuxpilot.settings import NatsConfig, default_config_path

log = structlog.get_logger("tuxpilot.agent")

# Dead letters are filed under tuxpilot.result.<host>.<plugin>.on_event.
DEAD_LETTER_ACTION = "on_event"
CONFIG_POLL_S = 1.0
# SIGTERM or Ctrl-C ends the process within this, whatever it was waiting for.
STOP_LIMIT_S = 8.0
T = TypeVar("T")
# One part's stop (`enter`); the gate's may wait for an action in flight (`gate.action_timeout_s`, twice).
PART_STOP_LIMIT_S = 30.0
EXIT_FORCED = 1


def plugin_dirs(config: Config) -> list[Path]:
    return [*config.plugin_dirs, builtin_dir()]


def host_plugins(config: Config) -> Installed:
    """Every plugin folder this host has: those it would load, and those it will not (and why). Plugins
    installed from packages are among them, each its current version's folder."""
    return installed([*config.plugin_dirs, *packages.folders(config.state_dir)], builtin_dir(), config)


@dataclass(frozen=True)
class LocalPlugins:
    """What `run_plugins` names: the plugins this host runs, and those it refuses, each with why."""

    run: dict[str, tuple[Path, Manifest]]
    refused: dict[str, Found]
    skipped: list[Found]  # every folder of the plugin dirs that is not loaded at all


def select_plugins(config: Config) -> LocalPlugins:
    """The plugins `config.run_plugins` names. One that cannot run here (a broken manifest, a name two
    folders hold, a runtime this host lacks) is refused, the others run; a name found in no folder at all
    is a config error."""
    found = host_plugins(config)
    run: dict[str, tuple[Path, Manifest]] = {}
    refused: dict[str, Found] = {}
    missing: list[str] = []
    # A plugin installed from a package runs without being named in run_plugins.
    for name in dict.fromkeys([*config.run_plugins, *packages.names(config.state_dir)]):
        if not config.plugin(name).enabled:
            continue
        chosen = found.plugins.get(name)
        if chosen is None:
            skipped = [f for f in found.skipped if f.name == name]
            if skipped:
                refused[name] = skipped[0]
            else:
                missing.append(name)
        elif chosen.runnable and chosen.manifest is not None:
            run[name] = (chosen.folder, chosen.manifest)
        else:
            refused[name] = chosen
    if missing:
        where = ", ".join(str(d) for d in plugin_dirs(config))
        raise ConfigError(f"config key run_plugins: no plugin named {', '.join(missing)} in {where}")
    return LocalPlugins(run, refused, found.skipped)


def local_plugins(config: Config) -> dict[str, tuple[Path, Manifest]]:
    """The plugins `config.run_plugins` names that this host runs."""
    return select_plugins(config).run


async def enter(stack: contextlib.AsyncExitStack, part: contextlib.AbstractAsyncContextManager[T]) -> T:
    """`stack.enter_async_context(part)`, with the part's stop bounded by `PART_STOP_LIMIT_S`: a part that
    cannot stop is logged with where it waits, cancelled, and the parts below it still stop (the
    embedded server above all)."""
    value = await part.__aenter__()
    name = getattr(getattr(part, "gen", None), "__name__", None) or type(part).__name__

    async def bounded_exit(*exc: Any) -> bool:
        exiting = asyncio.ensure_future(part.__aexit__(*exc))
        done, _ = await asyncio.wait({exiting}, timeout=PART_STOP_LIMIT_S)
        if exiting in done:
            return bool(exiting.result())
        others = [t for t in asyncio.all_tasks() if t is not exiting and t is not asyncio.current_task()]
        log.error("agent.part_stop_timeout", part=name, limit_s=PART_STOP_LIMIT_S,
                  waiting_in=_where(exiting, getattr(part, "gen", None)),
                  tasks=[_where(t) for t in others][:20])
        exiting.cancel()
        await asyncio.wait({exiting}, timeout=PART_STOP_LIMIT_S)
        return False

    stack.push_async_exit(bounded_exit)
    return value


@contextlib.asynccontextmanager
async def embedded_server(cfg: Config, authorization: str) -> AsyncIterator[NatsServer]:
    """The embedded nats-server on the state dir's store, restarted on the same port and store whenever it
    dies; its URL is in the state dir while it runs."""
    server = NatsServer(
        cfg.state_dir / "nats",
        host=cfg.embedded.host,
        port=cfg.embedded.port,
        sync_interval=cfg.embedded.sync_interval,
        extra_config=authorization,
    )
    await asyncio.to_thread(server.start, cfg.embedded.ready_timeout_s)
    url_file = bus.url_file(cfg.state_dir)
    try:
        url_file.write_text(server.url + "\n")
        async with background(server.supervise(cfg.embedded.ready_timeout_s), name="nats-server-supervisor"):
            yield server
    finally:
        await asyncio.to_thread(server.stop)
        with contextlib.suppress(OSError):
            url_file.unlink()


@contextlib.asynccontextmanager
async def connection(
    cfg: NatsConfig, url: str, *, name: str, on_reconnect: Callable[[], Awaitable[None]]
) -> AsyncIterator[Client]:
    """A connection drained when it is no longer needed: what was published is sent first."""
    nc = await bus.connect(cfg, url, name=name, on_reconnect=on_reconnect)
    try:
        yield nc
    finally:
        try:
            await nc.drain()
        except Exception as exc:  # a link that is already gone has nothing left to drain
            log.warning("agent.drain_failed", error=f"{type(exc).__name__}: {exc}")
            await nc.close()


@contextlib.asynccontextmanager
async def subscription(nc: Client, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> AsyncIterator[None]:
    sub = await nc.subscribe(subject, cb=cb)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # the connection may be closed already
            await sub.unsubscribe()


@contextlib.asynccontextmanager
async def background(work: Coroutine[Any, Any, None], *, name: str) -> AsyncIterator[asyncio.Task[None]]:
    """A task that runs while the block does, cancelled and awaited when it ends."""
    task = asyncio.create_task(work, name=name)
    try:
        yield task
    finally:
        await cancel(task)


class Agent:
    """One host's agent. `embedded`: start a local nats-server when no URL is configured.

    Its parts are async context managers entered on one `AsyncExitStack` in `start()`, in the order
    they depend on each other; `stop()` closes the stack, so they stop in reverse, and a start that
    fails half-way stops what it had started. `async with Agent(config):` does both.
    """

    def __init__(
        self,
        config: Config,
        *,
        embedded: bool = True,
        run_plugins: bool = True,
        reader: Callable[[], Reading] | None = None,
    ):
        self.config = config
        self.reader = reader
        self.subjects = Subjects.of(config)
        self.embedded = embedded and not config.nats.url
        self.run_plugins = run_plugins
        # Set as the parts start, for those who look at a running agent (the CLI, tests); never stopped by hand.
        self.server: NatsServer | None = None
        self.nc: Client | None = None
        self.registry: Registry | None = None
        self.gate: Gate | None = None
        self.handrun: HandRun | None = None
        self.installer: Installer | None = None
        self._plugins: dict[str, tuple[Path, Manifest]] = {}  # what the host runs: name -> (folder, manifest)
        self._plugins_lock = asyncio.Lock()
        self._applying: set[asyncio.Task[None]] = set()
        self.monitor: Monitor | None = None
        self.automation: Automation | None = None
        self.host: PluginHost | None = None
        self.url: str = ""
        self.outbox: Outbox | None = None
        self.heartbeat: Heartbeat | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._states: KeyValue | None = None

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._start_parts(stack)
            self._stack = stack.pop_all()  # started: kept open until stop()

    async def _start_parts(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        selected = select_plugins(cfg) if self.run_plugins else LocalPlugins({}, {}, [])
        plugins = self._plugins = selected.run
        stack.enter_context(state_dir_lock(cfg.state_dir))  # before anything in the state dir is touched
        credentials: dict[str, Path] = {}
        nats_cfg = cfg.nats
        if self.embedded:
            authorization = ""
            if cfg.embedded.auth:
                users = auth.users_for(self.subjects, {name: m for name, (_, m) in plugins.items()})
                hashes = await asyncio.to_thread(auth.provision, cfg.state_dir, users)
                authorization = auth.server_config(users, hashes)
                credentials = {
                    u.plugin: auth.credential_file(cfg.state_dir, u.name) for u in users if u.plugin is not None
                }
                nats_cfg = cfg.nats.model_copy(
                    update={"user_file": auth.credential_file(cfg.state_dir, auth.agent_user(self.subjects).name)}
                )
            self.server = await enter(stack, embedded_server(cfg, authorization))
            self.url = self.server.url
        else:
            if cfg.fleet.enrollment is not None:
                nats_cfg, credentials = await asyncio.to_thread(self._fleet_users, plugins)
            url = bus.local_url(cfg)
            if url is None:
                raise ConfigError("config key nats.url: not set, and no local `tuxpilot up` is running")
            self.url = url
        self.nc = nc = await enter(
            stack,
            connection(nats_cfg, self.url, name=f"tuxpilot-agent-{cfg.host_id}", on_reconnect=self._on_reconnect)
        )
        js = nc.jetstream()
        # Decided once, from the servers the connection knows: every stream, bucket and plugin after this
        # (plugins get the streams section in their environment) uses the same count.
        cfg.streams = cfg.streams.model_copy(update={"replicas": replicas_for(nc, cfg.streams)})
        # A fleet's shared streams are its administrator's to change (a host's key may not rewrite the
        # audit stream, whose sources name the leaf hosts): a host only creates what is missing.
        await ensure_streams(js, self.subjects, cfg.streams, update=cfg.fleet.enrollment is None)
        # What plugins may not do for themselves under generated authorization.
        await open_bucket(js, self.subjects, cfg.streams.replicas)
        for name, (_, manifest) in plugins.items():
            await create_plugin_consumer(js, manifest, self.subjects, cfg.streams, history=cfg.plugin(name).history)
        await enter(
            stack,
            background(
                guard_plugin_consumers(js, self._guarded, self.subjects, cfg.streams, CHECK_EVERY_S),
                name="consumer-guard",
            )
        )
        self._states = await state_bucket(js, self.subjects, cfg.streams.replicas)
        await self._refuse(selected)
        self.outbox = await enter(stack, Outbox(self._send_event, limit=cfg.monitor.buffer_events))
        await enter(
            stack,
            subscription(
                nc, f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{Names.of(self.subjects).events}.*",
                self._on_dead_letter,
            )
        )
        # The gate decides from the manifests this host loaded itself: every installed plugin's; the
        # registry bucket gets the entries of the plugins it runs.
        installed = {name: f.manifest for name, f in host_plugins(cfg).plugins.items() if f.manifest is not None}
        running = {name: m for name, (_, m) in plugins.items()}
        self.registry = await enter(stack, Registry(nc, self.subjects, {**installed, **running}, running))
        self.gate = await enter(stack, Gate(nc, cfg, self.registry))
        if cfg.fleet.enrollment is not None:  # a fleet's host answers fleet-wide calls that target it
            await enter(stack, FanOut(nc, self.subjects, cfg.fleet.labels, self.gate))
            beats = await open_heartbeats(js, self.subjects, cfg.streams.replicas)
            self.heartbeat = await enter(
                stack,
                Heartbeat(beats, cfg.host_id, cfg.fleet.labels, cfg.fleet.heartbeat_s, self._publish_event)
            )
        # Rules, schedules and approvals act only through the gate.
        self.automation = await enter(stack, Automation(nc, cfg, self.gate))
        # `tuxpilot plugin run` asks it to load a folder
        self.handrun = HandRun(nc, cfg, self.server, plugins, on_loaded=self.gate.add_plugin)
        await enter(stack, subscription(nc, self.handrun.subject, self.handrun.handle))
        # `tuxpilot plugin install|update|remove` ask it to install from packages
        self.installer = await enter(stack, Installer(self))
        if cfg.monitor.enabled:
            self.monitor = await enter(
                stack,
                Monitor(cfg.monitor, cfg.host_id, self._publish_event, self._publish_metrics, reader=self.reader)
            )
        if plugins:
            host = PluginHost(cfg, self.url, plugins, report=self._publish_event, publish=self._publish_state,
                              handoff_timeout_s=functools.partial(handoff_timeout_s, cfg))
            host.credentials = credentials
            self.host = await enter(stack, host)
        await enter(stack, background(self._watch_config(), name="config-watch"))
        log.info("agent.started", host=cfg.host_id, url=self.url, plugins=sorted(plugins),
                 not_runnable=sorted(selected.refused))

    def _fleet_users(self, plugins: dict[str, tuple[Path, Manifest]]) -> tuple[NatsConfig, dict[str, Path]]:
        """An enrolled host mints its agent's and plugins' users from its scoped keys (no server change):
        the agent connects as its own, each plugin gets a `.creds` of its own name."""
        cfg = self.config
        assert cfg.fleet.enrollment is not None
        enrollment = member.load_enrollment(cfg.fleet.enrollment)
        if enrollment.host != cfg.host_id or enrollment.prefix != cfg.subject_prefix:
            raise ConfigError(f"fleet.enrollment {cfg.fleet.enrollment} is for host {enrollment.host} "
                              f"(prefix {enrollment.prefix}), not {cfg.host_id} ({cfg.subject_prefix})")
        agent = member.write_creds(cfg.state_dir, enrollment, "agent")
        creds = {name: member.write_creds(cfg.state_dir, enrollment, "plugin", name) for name in plugins}
        return cfg.nats.model_copy(update={"creds": agent, "user": f"tuxpilot-{cfg.host_id}-agent"}), creds

    def reload(self) -> None:
        """Take grants and gate policy from the config file again (after `plugin grant`, or SIGHUP)."""
        path = self.config.source or default_config_path()
        try:
            fresh = load_config(path if path.is_file() else None)
        except ConfigError as exc:
            log.error("config.reload_failed", error=exc.message)
            return
        self.config.plugins = fresh.plugins
        self.config.gate = fresh.gate
        self.config.marketplace = fresh.marketplace  # what the next install accepts (unsigned or not)
        if self.automation is not None:
            self.automation.reload(fresh)
        log.info("config.reloaded", path=str(path), plugins={n: p.permissions for n, p in fresh.plugins.items()})
        # run_plugins, plugin_dirs or a plugin's `enabled` may have changed: the plugins follow, live.
        task = asyncio.get_running_loop().create_task(self._apply_run_plugins(fresh), name="apply-run-plugins")
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    def _guarded(self) -> list[tuple[Manifest, bool]]:
        """The local plugins whose consumers the agent keeps as it made them: supervised and run by hand."""
        running = {**(self.handrun.loaded if self.handrun is not None else {}), **self._plugins}
        return [(manifest, self.config.plugin(name).history) for name, (_, manifest) in running.items()]

    async def _apply_run_plugins(self, fresh: Config) -> None:
        """Start the plugins `run_plugins` gained and stop those it lost, without a restart."""
        async with self._plugins_lock:
            if not self.run_plugins or self._stack is None or self.nc is None or self.handrun is None:
                return  # an agent that runs no plugins (or is stopping)
            trial = self.config.model_copy(update={"run_plugins": fresh.run_plugins, "plugin_dirs": fresh.plugin_dirs})
            try:
                selected = select_plugins(trial)
            except ConfigError as exc:
                log.error("config.run_plugins_not_applied", error=exc.message, running=sorted(self._plugins))
                return
            wanted = selected.run
            await self._refuse(selected)
            current = self._plugins
            stop = [n for n, (folder, _) in current.items() if n not in wanted or wanted[n][0] != folder]
            start = {n: v for n, v in wanted.items() if n not in current or n in stop}
            for name in stop:
                await self.stop_plugin(name)
            for name, (folder, manifest) in start.items():
                await self.start_plugin(name, folder, manifest)
            self.config.run_plugins, self.config.plugin_dirs = fresh.run_plugins, fresh.plugin_dirs
            if start or stop:
                log.info("config.plugins_applied", started=sorted(start), stopped=sorted(stop),
                         running=sorted(current))

    async def start_plugin(self, name: str, folder: Path, manifest: Manifest) -> None:
        """Run one more plugin, without a restart: its NATS user, its durable consumer, the gate's manifest and
        its registry entry, then its process under the plugin host's supervision. Callers hold `plugins_lock`."""
        if self._stack is None or self.nc is None or self.handrun is None:
            raise Unavailable("the agent is starting or stopping: try again")
        credentials = await self._credentials({name: manifest})
        await create_plugin_consumer(self.nc.jetstream(), manifest, self.subjects, self.config.streams,
                                     history=self.config.plugin(name).history)
        if self.host is None:
            host = PluginHost(self.config, self.url, {}, report=self._publish_event, publish=self._publish_state,
                              handoff_timeout_s=functools.partial(handoff_timeout_s, self.config))
            self.host = await enter(self._stack, host)
        self._plugins[name] = (folder, manifest)
        if self.gate is not None:
            await self.gate.add_plugin(manifest)
        self.host.add(name, folder, manifest, credentials.get(name))

    async def stop_plugin(self, name: str) -> None:
        """Stop one plugin for good; its user, consumer and registry entry stay (`forget_plugin` drops them)."""
        if self.host is not None:
            await self.host.remove(name)
        self._plugins.pop(name, None)

    async def forget_plugin(self, name: str) -> None:
        """What the agent keeps for a stopped plugin, deleted: its NATS user and credential file, its durable
        consumer, its registry entry and state, the gate's manifest."""
        assert self.nc is not None and self.handrun is not None
        if self.config.fleet.enrollment is not None:
            member.forget_creds(self.config.state_dir, name)
        else:
            await self.handrun.drop_users([name])
        await delete_plugin_consumer(self.nc.jetstream(), name, self.subjects)
        if self.registry is not None:
            await self.registry.remove(name)
        if self._states is not None:
            await forget_state(self._states, self.config.host_id, name)

    async def _credentials(self, manifests: dict[str, Manifest]) -> dict[str, Path]:
        """Each plugin's credential file: minted from the host's scoped key on a fleet's host (no server
        change), else a user added to the embedded server (none without generated authorization)."""
        assert self.handrun is not None
        if self.config.fleet.enrollment is not None:
            enrollment = member.load_enrollment(self.config.fleet.enrollment)
            return {name: await asyncio.to_thread(member.write_creds, self.config.state_dir, enrollment, "plugin", name)
                    for name in manifests}
        return await self.handrun.add_users(manifests)

    @property
    def plugins_lock(self) -> asyncio.Lock:
        """Held while the set of running plugins changes (a config edit, an install)."""
        return self._plugins_lock

    def running_plugins(self) -> dict[str, tuple[Path, Manifest]]:
        return dict(self._plugins)

    async def _watch_config(self) -> None:
        path = self.config.source or default_config_path()

        def stamp() -> float | None:
            try:
                return path.stat().st_mtime
            except OSError:
                return None

        seen = stamp()
        while True:
            await asyncio.sleep(CONFIG_POLL_S)
            now_stamp = stamp()
            if now_stamp != seen:
                seen = now_stamp
                self.reload()

    async def _send_event(self, event: Event) -> None:
        assert self.nc is not None
        if not self.nc.is_connected:
            raise ConnectionError("not connected")
        await bus.publish_event(self.nc, self.subjects, event)
        if self.heartbeat is not None:
            self.heartbeat.last_event = f"{event.type} {event.time.isoformat()}"

    async def _publish_event(self, event: Event) -> None:
        assert self.outbox is not None
        await self.outbox.put(event)

    async def _on_reconnect(self) -> None:
        """Send what the monitor buffered during the outage, then say how many were dropped."""
        if self.outbox is None:
            return
        await self.outbox.flush()
        dropped = self.outbox.take_dropped()
        if dropped:
            log.warning("agent.events_dropped", host=self.config.host_id, dropped=dropped)
            await self.outbox.put(
                Event.new(
                    "agent.events_dropped",
                    self.config.host_id,
                    source="monitor",
                    value=dropped,
                    data={"why": "the server was unreachable and the buffer was full"},
                )
            )

    async def _on_dead_letter(self, msg: Msg) -> None:
        """An event that exhausted its deliveries to a plugin becomes a `dead_letter` audit record."""
        assert self.nc is not None
        try:
            advisory = json.loads(msg.data)
            consumer = await self.nc.jetstream().consumer_info(advisory["stream"], advisory["consumer"])
            meta = consumer.config.metadata or {}
            stored = await self.nc.jetstream().get_msg(advisory["stream"], advisory["stream_seq"])
            event = Event.model_validate_json(stored.data or b"{}")
        except Exception as exc:
            log.error("agent.dead_letter_unreadable", error=f"{type(exc).__name__}: {exc}")
            return
        if event.host != self.config.host_id:
            return
        plugin = meta.get("plugin", "unknown")
        result = Result(
            status="dead_letter",
            reason="max_deliveries",
            message=f"{plugin} failed to handle event {event.type} {advisory.get('deliveries')} times; given up",
            host=event.host,
            plugin=plugin,
            action=DEAD_LETTER_ACTION,
            event_id=event.id,
            data={"event": event.to_doc()},
            time=now(),
        )
        log.error("agent.dead_letter", plugin=plugin, event_id=event.id, type=event.type)
        await self.nc.publish(self.subjects.result(plugin, DEAD_LETTER_ACTION), result.to_json())

    async def _refuse(self, selected: LocalPlugins) -> None:
        """Say, one line each, which plugin folders are not loaded and which plugins will not run here."""
        for found in selected.skipped:
            log.error("plugin.skipped", plugin=found.name, folder=str(found.folder), reason=found.problem)
        for name, found in selected.refused.items():
            log.error("plugin.not_runnable", plugin=name, runtime=found.runtime, reason=found.problem)
            await self._publish_state(PluginState(host=self.config.host_id, plugin=name, state="not_runnable",
                                                  runtime=found.runtime, reason=found.problem))

    async def _publish_state(self, state: PluginState) -> None:
        """What the plugin host knows of a plugin, where `tuxpilot status` reads it."""
        if self._states is not None:
            await put_state(self._states, state)
        if self.heartbeat is not None:
            self.heartbeat.plugins[state.plugin] = str(state.state)
            if state.reason and state.state not in ("running", "starting"):
                self.heartbeat.last_error = f"{state.plugin}: {state.reason}"

    async def _publish_metrics(self, metrics: Metrics) -> None:
        assert self.nc is not None
        if self.gate is not None:  # the gate's backlog rides along, for dashboards (the prometheus plugin)
            try:
                metrics.gate = await self.gate.load()
            except Exception as exc:  # a snapshot without it is still worth sending
                log.debug("agent.gate_load_unknown", error=f"{type(exc).__name__}: {exc}")
        await self.nc.publish(self.subjects.metrics(), metrics.to_json())

    async def stop(self) -> None:
        """Every part, in reverse order of starting; each part's failure to stop is logged and the rest still stop."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        await cancel(*self._applying)  # a run_plugins change being applied: the host stops them all anyway
        await stack.aclose()
        log.info("agent.stopped", host=self.config.host_id)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Start, run until SIGINT or SIGTERM, stop. A signal during start-up stops it there, and the
        process ends within `STOP_LIMIT_S` of the first signal whatever it waits for (a slow or frozen
        server, a plugin that ignores SIGTERM); a second signal ends it at once."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        watchdog = threading.Timer(STOP_LIMIT_S, self._force_exit, args=("stop_limit",))
        watchdog.daemon = True

        def on_signal() -> None:
            if stop.is_set():
                self._force_exit("second_signal")
            stop.set()
            watchdog.start()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        starting = asyncio.create_task(self.start(), name="agent-start")
        stopping = asyncio.create_task(stop.wait(), name="agent-stop-signal")
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a failed start raises here
                if ready is not None:
                    ready.set()
                await stopping
            else:
                log.warning("agent.start_interrupted", host=self.config.host_id)
                starting.cancel()  # start-up stops the parts it had started, in reverse
                await asyncio.wait({starting})
        finally:
            stopping.cancel()
            await self.stop()
            watchdog.cancel()

    def _force_exit(self, why: str) -> None:
        """End the process now (from the watchdog thread or a second signal): what did not stop in time is
        killed, children first, so nothing is left behind."""
        log.error("agent.stop_forced", host=self.config.host_id, why=why, limit_s=STOP_LIMIT_S)
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        os._exit(EXIT_FORCED)


def _where(task: asyncio.Future[Any], inner: object = None) -> str:
    """A task's name and the lines it waits on, outermost first (then those of `inner`, an async generator
    it resumes, which its own chain cannot reach), for a log line."""
    if not isinstance(task, asyncio.Task):
        return "future"
    frames = _awaiting(task.get_coro()) + _awaiting(inner)
    lines = [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}" for f in frames]
    return f"{task.get_name()}: {' > '.join(lines[-6:]) or 'not started'}"


def _awaiting(obj: object) -> list[FrameType]:
    """The frames of a suspended coroutine or generator and of what it awaits, in turn."""
    frames: list[FrameType] = []
    while obj is not None and len(frames) < 50:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None) or getattr(obj, "gi_yieldfrom", None)
    return frames
