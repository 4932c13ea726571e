"""The plugin host: starts each local plugin as its own confined process, restarts it with backoff when
it dies, and reports crash loops (and recoveries) as events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from tuxpilot.lifetime import Part, cancel
from tuxpilot.protocol import launch
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import Manifest, Permission
from tuxpilot.protocol.models import Event, Severity
from tuxpilot.protocol.plugin_state import Exit, PluginState, State
from tuxpilot.runtimes import container
from tuxpilot.runtimes.base import Launch
from tuxpilot.runtimes.catalog import runtime_of
from tuxpilot.runtimes.confine import Confinement, Plan
from tuxpilot.runtimes.loader import plugin_path
from tuxpilot.runtimes.settings import HostSettings
from tuxpilot.runtimes.wasm import sandbox_dirs
from tuxpilot.settings import environment_of

log = structlog.get_logger("tuxpilot.host")

# Takes an event about a plugin (plugin.crash_loop, plugin.recovered…) to the bus.
Report = Callable[[Event], Awaitable[None]]
# Takes what the host knows of a plugin (running, exited, crash loop…) to where `status` reads it.
Publish = Callable[[PluginState], Awaitable[None]]


def backoff(previous: float, start: float = 0.5, limit: float = 60.0) -> float:
    return start if previous <= 0 else min(previous * 2, limit)


def plugin_command(folder: Path, manifest: Manifest) -> list[str]:
    """The command line of the plugin in `folder`, as its runtime starts it (without limits)."""
    return runtime_of(manifest).launch(folder, manifest, {}, plugin_path()).argv


def launch_of(plugin: Supervised) -> Launch:
    limits = plugin.plan.limits if plugin.plan is not None else {}
    return runtime_of(plugin.manifest).launch(plugin.folder, plugin.manifest, limits, plugin_path())


def describe_exit(code: int | None) -> dict[str, Any]:
    """An exit status as event data: the exit code, or the signal that ended the process."""
    if code is None:
        return {"exit_code": None, "signal": None}
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return {"exit_code": None, "signal": name}
    return {"exit_code": code, "signal": None}


@dataclass
class Supervised:
    """One local plugin, how it runs, and its restart history."""

    name: str
    folder: Path
    manifest: Manifest
    restarts: int = 0
    pid: int | None = None
    delay: float = 0.0
    plan: Plan | None = None
    exits: deque[float] = field(default_factory=deque)  # when it exited, within the crash-loop window
    looping: bool = False  # a crash loop was reported and the plugin has not stayed up since
    removed: bool = False  # taken out of run_plugins while the host runs: not restarted again
    refused: str | None = None  # why it was not started at all (its runtime or confinement said no)
    last_exit: Exit | None = None
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)


class PluginHost(Part):
    """Runs `config.run_plugins` as child processes until stopped.

    `report` takes the events the host raises about its plugins; the agent publishes them as it
    publishes the monitor's. `publish` takes each plugin's state whenever it changes.
    """

    def __init__(
        self,
        config: HostSettings,
        url: str,
        plugins: dict[str, tuple[Path, Manifest]],
        report: Report | None = None,
        publish: Publish | None = None,
        handoff_timeout_s: Callable[[Manifest], float] | None = None,
    ):
        self.config = config
        # How long each plugin waits for the gate to decide a proposal it hands over (none: it stores them).
        self.handoff_timeout_s = handoff_timeout_s or (lambda manifest: 0.0)
        self.publish = publish
        self.url = url
        self.plugins = {
            name: Supervised(name, folder, manifest) for name, (folder, manifest) in plugins.items()
        }
        self.report = report
        self.confinement = Confinement(config)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Each plugin's own credential file, under generated authorization.
        self.credentials: dict[str, Path] = {}

    def workdir(self, plugin: Supervised) -> Path:
        return self.config.state_dir / "plugins" / plugin.name

    def environment(self, plugin: Supervised) -> dict[str, str]:
        """Only what the plugin needs: where the bus is, who it is on it, its own settings."""
        env = {
            k: v
            for k, v in os.environ.items()
            if (k in launch.KEEP_ENV or k.startswith(launch.ENV_PREFIX))
            and k not in launch.AGENT_SECRETS | launch.HOST_SET
        }
        user_file = self.credentials.get(plugin.name)
        if user_file is not None and user_file.suffix == ".creds":
            # A fleet host's plugin: a user minted from the host's key, named after the plugin; its
            # reply inboxes are under the prefix the key's template allows it.
            env[launch.env_name("nats", "creds")] = str(user_file)
            env[launch.env_name("nats", "user")] = f"tuxpilot-{self.config.host_id}-plugin-{plugin.name}"
        elif user_file is not None:
            env[launch.NATS_USER_FILE] = str(user_file)
        nats = environment_of(self.config.nats, "nats")
        env.update({k: v for k, v in nats.items() if k in {launch.env_name("nats", s) for s in launch.NATS_SHARED}})
        env.update(environment_of(self.config.streams, launch.STREAMS_SECTION))
        env.update({
            # A plugin reads no config file (it may not be able to, and should not read the agent's
            # credentials in it): everything it needs is here.
            launch.CONFIG: os.devnull,
            launch.PLUGINS: json.dumps({plugin.name: {"config": self.config.plugin(plugin.name).config}}),
            launch.NATS_URL: self.url,
            launch.HOST_ID: self.config.host_id,
            launch.STATE_DIR: str(self.config.state_dir),
            launch.SUBJECT_PREFIX: self.config.subject_prefix,
            launch.LOG_LEVEL: self.config.log.level,
            launch.LOG_FORMAT: self.config.log.format,
            launch.PLUGIN: plugin.name,
            launch.HANDOFF_TIMEOUT: f"{self.handoff_timeout_s(plugin.manifest):g}",
        })
        plan = plugin.plan
        if plan is not None and plan.account is not None:
            env["HOME"] = str(self.workdir(plugin))
        env.update(launch_of(plugin).env)  # what its runtime adds, e.g. how its limits map
        if plugin.manifest.runtime == "wasm":
            settings = self.config.plugin(plugin.name)
            dirs = sandbox_dirs(settings.sandbox_dirs, settings.granted(plugin.manifest))
            env[launch.SANDBOX_DIRS] = json.dumps(dirs)
        if plugin.manifest.runtime == "container":
            settings = self.config.plugin(plugin.name)
            network = Permission.network_access in settings.granted(plugin.manifest)
            env[container.SPEC] = container.host_spec(
                env[container.SPEC], host=self.config.host_id, plugin=plugin.name,
                account=plan.account if plan is not None else None, credential=self.credentials.get(plugin.name),
                cpus=settings.cpus, network=container.network_mode(network, self.config.nats.tls_ca is not None),
                env=env,
            )
        return env

    async def start(self) -> None:
        for plugin in self.plugins.values():
            self._tasks.append(asyncio.create_task(self._supervise(plugin), name=f"plugin-{plugin.name}"))

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        for plugin in self.plugins.values():
            if plugin.proc is not None and plugin.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    plugin.proc.send_signal(signal.SIGTERM)
        for plugin in self.plugins.values():
            if plugin.proc is None:
                continue
            try:
                await asyncio.wait_for(plugin.proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    plugin.proc.kill()
                await plugin.proc.wait()
        await cancel(*self._tasks)
        for plugin in self.plugins.values():
            if plugin.plan is not None and plugin.plan.refused is None:
                await self._state(plugin, "stopped")

    def add(self, name: str, folder: Path, manifest: Manifest, credentials: Path | None = None) -> None:
        """Start supervising one more plugin (`run_plugins` grew while the agent runs)."""
        if name in self.plugins or self._stopping:
            return
        if credentials is not None:
            self.credentials[name] = credentials
        plugin = self.plugins[name] = Supervised(name, folder, manifest)
        self._tasks.append(asyncio.create_task(self._supervise(plugin), name=f"plugin-{name}"))

    async def remove(self, name: str, grace_s: float = 5.0) -> None:
        """Stop one plugin for good (taken out of `run_plugins`): SIGTERM, SIGKILL after `grace_s`."""
        plugin = self.plugins.pop(name, None)
        if plugin is None:
            return
        plugin.removed = True
        proc = plugin.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in [t for t in self._tasks if t.get_name() == f"plugin-{name}"]:
            await cancel(task)
            self._tasks.remove(task)
        # A process started between the signal and the cancel would outlive its supervisor.
        if plugin.proc is not None and plugin.proc is not proc and plugin.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                plugin.proc.kill()
            await plugin.proc.wait()
        await self._state(plugin, "stopped")

    def failure(self, name: str) -> str | None:
        """Why a plugin added a moment ago is not up: refused, or its process exited (and how); None while
        it runs or has not started yet."""
        plugin = self.plugins.get(name)
        if plugin is None:
            return "not supervised"
        if plugin.refused is not None:
            return f"refused: {plugin.refused}"
        if plugin.restarts and plugin.last_exit is not None:
            last = plugin.last_exit
            how = f"signal {last.signal}" if last.signal else f"code {last.exit_code}"
            return f"its process exited ({how})"
        return None

    async def _supervise(self, plugin: Supervised) -> None:
        plog = log.bind(plugin=plugin.name, host=self.config.host_id)
        workdir = self.workdir(plugin)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            plan = plugin.plan = await self.confinement.plan(
                plugin.name, plugin.folder, plugin.manifest, workdir, self.credentials.get(plugin.name),
                self.environment(plugin),
            )
        except Exception:  # a bug, not a refusal: say so instead of ending the task silently
            plog.exception("plugin.not_started")
            return
        if plan.refused is not None:
            plog.error("plugin.refused", reason=plan.refused, fix=plan.fix, strict=True)
            plugin.refused = f"{plan.refused}; fix: {plan.fix}"
            await self._state(plugin, "refused", reason=plugin.refused)
            await self._report(plugin, "plugin.refused", "critical", reason=plan.refused, fix=plan.fix)
            return
        try:
            await runtime_of(plugin.manifest).prepare(plugin.folder, plugin.manifest, plog)
        except TuxPilotError as exc:  # refused once, not restarted in a loop that cannot succeed
            plog.error("plugin.refused", reason=exc.message, runtime=plugin.manifest.runtime)
            plugin.refused = exc.message
            await self._state(plugin, "refused", reason=exc.message)
            await self._report(plugin, "plugin.refused", "critical", reason=exc.message,
                               runtime=plugin.manifest.runtime)
            return
        if plan.unconfined is not None:
            plog.warning("plugin.unconfined", user=plan.user, reason=plan.unconfined, fix=plan.fix)
            await self._report(plugin, "plugin.unconfined", "warning", user=plan.user, reason=plan.unconfined,
                               fix=plan.fix)
        sup = self.config.supervision
        while not (self._stopping or plugin.removed):
            started = time.monotonic()
            code = await self._run_once(plugin, plan, workdir, plog)
            if self._stopping or plugin.removed:
                break
            now = time.monotonic()
            plugin.delay = (
                0.0 if now - started > sup.healthy_after_s
                else backoff(plugin.delay, sup.backoff_start_s, sup.backoff_max_s)
            )
            plugin.restarts += 1
            plugin.exits.append(now)
            while plugin.exits and now - plugin.exits[0] > sup.crash_loop_window_s:
                plugin.exits.popleft()
            status = describe_exit(code)
            plugin.last_exit = Exit(**status)
            plog.warning("plugin.process_exited", **status, restart_in_s=plugin.delay, restarts=plugin.restarts)
            if plugin.looping or len(plugin.exits) >= sup.crash_loop_restarts:
                await self._state(plugin, "crash_loop", reason=(
                    f"exited {len(plugin.exits)} times within {sup.crash_loop_window_s:g} s; "
                    f"next start in {plugin.delay:g} s"))
            else:
                await self._state(plugin, "exited", reason=f"restarting in {plugin.delay:g} s")
            if not plugin.looping and len(plugin.exits) >= sup.crash_loop_restarts:
                plugin.looping = True
                plog.error("plugin.crash_loop", restarts=len(plugin.exits), window_s=sup.crash_loop_window_s,
                           **status, next_backoff_s=plugin.delay)
                await self._report(
                    plugin, "plugin.crash_loop", "critical", value=len(plugin.exits),
                    restarts=len(plugin.exits), window_s=sup.crash_loop_window_s, total_restarts=plugin.restarts,
                    **status, next_backoff_s=plugin.delay, user=plan.user, limits=plan.limits,
                )
            await asyncio.sleep(plugin.delay)

    async def _run_once(self, plugin: Supervised, plan: Plan, workdir: Path, plog: Any) -> int | None:
        """Start the plugin's process and wait for it to end; its exit status (None: it never started)."""
        launch = launch_of(plugin)
        try:
            proc = plugin.proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                env=self.environment(plugin),
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                **plan.spawn_options(launch.rlimits, as_agent=launch.as_agent),
            )
        except (OSError, ValueError) as exc:  # e.g. the user may not run the program
            plog.error("plugin.start_failed", error=f"{type(exc).__name__}: {exc}", user=plan.user)
            return None
        plugin.pid = proc.pid
        plog.info("plugin.process_started", pid=proc.pid, restarts=plugin.restarts, user=plan.user,
                  limits=plan.limits)
        if not plugin.looping:
            await self._state(plugin, "running")
        if plugin.looping:
            healthy_after = self.config.supervision.healthy_after_s
            try:
                return await asyncio.wait_for(proc.wait(), healthy_after)
            except TimeoutError:
                plugin.looping = False
                plugin.exits.clear()
                plog.info("plugin.recovered", pid=proc.pid, up_s=healthy_after)
                await self._state(plugin, "running")
                await self._report(plugin, "plugin.recovered", "info", pid=proc.pid, up_s=healthy_after,
                                   total_restarts=plugin.restarts)
        return await proc.wait()

    async def _state(self, plugin: Supervised, state: State, reason: str | None = None) -> None:
        """Publish what the host knows of `plugin` now; never stops the supervision."""
        if self.publish is None:
            return
        running = state == "running" or (state == "crash_loop" and plugin.proc is not None
                                           and plugin.proc.returncode is None)
        doc = PluginState(
            host=self.config.host_id, plugin=plugin.name, state=state, runtime=plugin.manifest.runtime,
            reason=reason, pid=plugin.pid if running else None,
            user=plugin.plan.user if plugin.plan is not None else None, restarts=plugin.restarts,
            last_exit=plugin.last_exit,
        )
        try:
            await self.publish(doc)
        except Exception as exc:
            log.warning("plugin.state_not_published", plugin=plugin.name, host=self.config.host_id, state=state,
                        error=f"{type(exc).__name__}: {exc}")

    async def _report(self, plugin: Supervised, kind: str, severity: Severity, value: float | None = None,
                      **data: Any) -> None:
        if self.report is None:
            return
        event = Event.new(kind, self.config.host_id, severity=severity, source="agent", resource=plugin.name,
                          value=value, data=data)
        try:
            await self.report(event)
        except Exception as exc:  # reporting must never stop the supervision
            log.warning("plugin.report_failed", plugin=plugin.name, host=self.config.host_id, event=kind,
                        error=f"{type(exc).__name__}: {exc}")

