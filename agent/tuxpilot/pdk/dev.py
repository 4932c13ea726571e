"""`tuxpilot plugin dev PATH`: the plugin running against a real gate while its author edits it.

Against the local `tuxpilot up` (or, when none answers, a private embedded server and agent started
here), the agent loads the folder's manifest and provisions the plugin's NATS user as for `plugin run`
(agent control `load_plugin`, asked as the host's operator); this module then starts the plugin
process as the plugin host would (same launch environment and command line), restarts it whenever a
file of the folder changes (watchfiles), rebuilding a wasm guest with its build.sh and reinstalling a
JavaScript plugin's dependencies when its package files change, and shows in one view the plugin's
events, its proposals, the gate's decisions and results, and the plugin's own log lines. An event
given with `emit` is published once the plugin serves, again after each restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from tuxpilot.agent.config import Config, handoff_timeout_s
from tuxpilot.protocol.errors import ConfigError, TuxPilotError, Unavailable
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import environment_of

log = structlog.get_logger("tuxpilot.pdk.dev")

# What changes in a plugin folder without being the plugin's source: never a reason to restart.
IGNORED_DIRS = frozenset({"node_modules", "__pycache__", ".git", "target", ".pytest_cache", ".mypy_cache", ".venv"})
IGNORED_SUFFIXES = (".pyc", ".swp", ".swx", "~", ".tmp")
SERVING_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
BUILD_TIMEOUT_S = 300.0

# show(kind, text): kind is "event", "proposal", "result" (the bus document's JSON as text, with its subject
# before a space), "log" (a line the plugin wrote) or "dev" (what this loop does).
Show = Callable[[str, str], None]


@dataclass(frozen=True)
class Emit:
    """A test event to publish once the plugin serves (and after each restart)."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    resource: str | None = None


@dataclass
class Target:
    """Where the plugin runs: the bus, the operator's client on it, the host settings the agent has."""

    url: str
    operator: Client
    subjects: Subjects
    config: Config
    embedded: bool


def watch_filter(folder: Path, manifest: Manifest | None) -> Callable[[Any, str], bool]:
    """Which changed paths restart the plugin: not dependencies, caches or editor files, and not a wasm
    guest that build.sh writes (the rebuild after a source change would restart it a second time)."""
    built = None
    if manifest is not None and manifest.runtime == "wasm" and (folder / "build.sh").is_file():
        built = (folder / manifest.entry_point).resolve()

    def keep(_change: Any, path: str) -> bool:
        p = Path(path)
        try:
            parts = p.relative_to(folder).parts
        except ValueError:
            return False
        if any(part in IGNORED_DIRS for part in parts) or p.name.endswith(IGNORED_SUFFIXES):
            return False
        # The linker writes the guest beside itself first (plugin.wasm.tmp1234), then renames it.
        return built is None or p.parent.resolve() != built.parent or not p.name.startswith(built.name)

    return keep


def _changed(folder: Path, paths: set[str]) -> str:
    """The changed files, as the view names them: an editor's or sed's temporary file comes and goes, so
    only what is there is named."""
    there = sorted(str(Path(p).relative_to(folder)) for p in paths if Path(p).exists())
    return ", ".join(there[:5]) + (f" and {len(there) - 5} more" if len(there) > 5 else "") or "files removed"


class DevLoop:
    """One `plugin dev` session: `run()` until `stop` is set."""

    def __init__(self, folder: Path, show: Show, *, emit: Emit | None = None):
        self.folder = folder.resolve()
        self.show = show
        self.emit = emit
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.failed = False  # the session ended on an error (its watcher could not watch)

    # -- the target -------------------------------------------------------------------------------

    async def run(self, config: Config, stop: asyncio.Event, *, use_embedded: bool | None = None) -> None:
        """Against the local `tuxpilot up` unless `use_embedded` (None: the local one when it answers)."""
        if not use_embedded:
            target = await self._local(config, required=use_embedded is False)
            if target is not None:
                try:
                    await self._session(target, stop)
                finally:
                    await target.operator.close()
                return
        from tuxpilot.pdk.embedded import embedded

        # No cooldown: the same test event after each restart must reach the action again. The plugin
        # logs at info, into the view.
        quiet = {"TUXPILOT_LOG_LEVEL": "info", "TUXPILOT_GATE_COOLDOWN_S": "0"}
        async with embedded(self.folder, host=config.host_id, dry_run=False, run=False, extra=quiet) as rig:
            self.show("dev", f"embedded server and agent at {rig.url} (state {rig.state_dir}), host {config.host_id}")
            await self._session(Target(rig.url, rig.operator, rig.subjects, rig.agent.config, True), stop)

    async def _local(self, config: Config, *, required: bool) -> Target | None:
        from tuxpilot.agent.handrun import LOAD_PLUGIN
        from tuxpilot.bus import connect as bus

        url = bus.local_url(config)
        why = "no local `tuxpilot up` (no server URL configured or written)"
        if url is not None:
            try:
                nc = await bus.connect(bus.local_nats(config), url, name="tuxpilot-dev",
                                       give_up_after_s=config.nats.connect_timeout_s)
            except (TuxPilotError, OSError) as exc:
                why = f"no server answers at {url} ({getattr(exc, 'message', exc)})"
            else:
                subjects = Subjects.of(config)
                try:
                    await nc.request(subjects.agent_control(LOAD_PLUGIN), b"{}", timeout=2.0)
                except Exception as exc:  # no responders, a timeout, or not allowed: no agent of ours there
                    await nc.close()
                    why = f"no agent for host {config.host_id} answers at {url} ({type(exc).__name__})"
                else:
                    self.show("dev", f"using the local agent of host {config.host_id} at {url}")
                    return Target(url, nc, subjects, config, False)
        if required:
            raise Unavailable(why)
        self.show("dev", f"{why}: starting an embedded one")
        return None

    # -- the session ------------------------------------------------------------------------------

    async def _session(self, target: Target, stop: asyncio.Event) -> None:
        changes: asyncio.Queue[set[str]] = asyncio.Queue()
        async with contextlib.AsyncExitStack() as stack:
            await self._view(target, stack)
            watcher = asyncio.create_task(self._watch(changes, stop))
            watcher.add_done_callback(lambda task: self._watch_ended(task, stop))
            stack.callback(watcher.cancel)
            changed: set[str] = set()
            while not stop.is_set():
                started = await self._start(target, changed)
                waits = {asyncio.create_task(changes.get()), asyncio.create_task(stop.wait())}
                exited = asyncio.create_task(self.proc.wait()) if started and self.proc is not None else None
                if exited is not None:
                    waits.add(exited)
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if exited is not None and exited in done and not stop.is_set():
                    self.show("dev", f"the plugin exited ({self.proc.returncode if self.proc else '?'}); "
                                     "waiting for a change")
                    done, _ = await asyncio.wait({asyncio.create_task(changes.get()),
                                                  asyncio.create_task(stop.wait())},
                                                 return_when=asyncio.FIRST_COMPLETED)
                await self._stop_process()
                if stop.is_set():
                    break
                changed = set()
                for task in done:
                    result = task.result()
                    if isinstance(result, set):
                        changed |= result
                while not changes.empty():
                    changed |= changes.get_nowait()
                if changed:
                    shown = _changed(self.folder, changed)
                    self.restarts += 1
                    self.show("dev", f"changed: {shown}; restarting (restart {self.restarts})")

    def _watch_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """A watcher that cannot watch (no watchfiles, no inotify instance left) ends the session loudly:
        a dev loop that silently stops restarting on changes is worse than none."""
        if task.cancelled() or stop.is_set():
            return
        exc = task.exception()
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "it ended"
        log.error("dev.watch_failed", folder=str(self.folder), error=why)
        self.show("dev", f"error: cannot watch {self.folder} for changes ({why}); stopping")
        self.failed = True
        stop.set()

    async def _watch(self, changes: asyncio.Queue[set[str]], stop: asyncio.Event) -> None:
        from watchfiles import awatch

        manifest = None
        with contextlib.suppress(ConfigError):
            manifest = load_manifest(self.folder)
        async for batch in awatch(self.folder, stop_event=stop, watch_filter=watch_filter(self.folder, manifest),
                                  debounce=400, step=50, recursive=True):
            await changes.put({path for _change, path in batch})

    async def _view(self, target: Target, stack: contextlib.AsyncExitStack) -> None:
        """Subscribe the operator to what the view shows: this plugin's events, proposals and results."""
        try:
            manifest = load_manifest(self.folder)
        except ConfigError:
            return
        s = target.subjects

        def shown(kind: str) -> Callable[[Msg], Any]:
            async def cb(msg: Msg) -> None:
                self.show(kind, f"{msg.subject} {msg.data.decode(errors='replace')}")

            return cb

        subjects = [(s.event(p), "event") for p in manifest.subscribes]
        subjects += [(s.proposal(manifest.name), "proposal"), (s.handoff(manifest.name), "proposal"),
                     (s.result(manifest.name, "*"), "result")]
        for subject, kind in subjects:
            sub = await target.operator.subscribe(subject, cb=shown(kind))
            stack.push_async_callback(sub.unsubscribe)

    async def _start(self, target: Target, changed: set[str]) -> bool:
        """Prepare, load and start the plugin; False (and why, in the view) when it cannot start now."""
        try:
            manifest = load_manifest(self.folder)
            await self._prepare(manifest, changed)
            user_file = await self._load(target)
            argv, env = self._launch(target, manifest, user_file)
        except TuxPilotError as exc:
            self.show("dev", f"not started: {exc.message}; waiting for a change")
            return False
        self.proc = await asyncio.create_subprocess_exec(
            *argv, cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        asyncio.create_task(self._pump(self.proc))  # noqa: RUF006 - ends with the process's output
        self.show("dev", f"started {manifest.name} {manifest.version} ({manifest.runtime}), pid {self.proc.pid}")
        if not await self._serving(target, manifest.name):
            return True  # it may still come up; its log lines say why not
        self.show("dev", f"{manifest.name} is serving")
        if self.emit is not None:
            await self._emit(target)
        return True

    async def _prepare(self, manifest: Manifest, changed: set[str]) -> None:
        names = {Path(p).name for p in changed}
        if manifest.runtime == "wasm" and (self.folder / "build.sh").is_file():
            built = self.folder / manifest.entry_point
            if not built.is_file() or changed:
                self.show("dev", "building: sh build.sh")
                await self._run(["sh", str(self.folder / "build.sh")], "build.sh")
        if manifest.runtime == "javascript":
            from tuxpilot.runtimes import javascript

            if "package.json" in names and "package-lock.json" not in names:
                self.show("dev", "package.json changed: npm install --package-lock-only")
                await self._run(["npm", "install", "--package-lock-only", "--ignore-scripts", "--no-audit",
                                 "--no-fund", "--prefer-offline", "--loglevel=error"], "npm install")
            if not javascript.installed(self.folder):
                self.show("dev", "installing the plugin's dependencies: npm ci --omit=dev")
            await javascript.install(self.folder, log.bind(plugin=manifest.name))

    async def _run(self, argv: list[str], what: str) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, cwd=self.folder, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            raise TuxPilotError(f"{what} did not finish within {BUILD_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            for line in output.decode(errors="replace").splitlines()[-20:]:
                self.show("log", line)
            raise TuxPilotError(f"{what} failed (exit {proc.returncode})")

    async def _load(self, target: Target) -> Path | None:
        """The agent loads the folder's manifest (again: it may have changed) and gives the plugin its user."""
        from tuxpilot.agent.handrun import LOAD_PLUGIN

        reply = await target.operator.request(target.subjects.agent_control(LOAD_PLUGIN),
                                              json.dumps({"folder": str(self.folder)}).encode(), timeout=15.0)
        doc = json.loads(reply.data)
        if "code" in doc:
            raise TuxPilotError(f"the agent did not load {self.folder}: {doc.get('message')}", code=doc["code"])
        user_file = doc.get("user_file")
        return Path(user_file) if user_file else None

    def _launch(self, target: Target, manifest: Manifest, user_file: Path | None) -> tuple[list[str], dict[str, str]]:
        from tuxpilot.runtimes.host import PluginHost, launch_of

        host = PluginHost(target.config, target.url, {manifest.name: (self.folder, manifest)},
                          handoff_timeout_s=functools.partial(handoff_timeout_s, target.config))
        if user_file is not None:
            host.credentials[manifest.name] = user_file
        plugin = host.plugins[manifest.name]
        env = host.environment(plugin)
        nats = target.config.nats.model_copy(update={"url": target.url, "user_file": user_file})
        env.update(environment_of(nats, "nats"))
        env.setdefault("PATH", os.environ.get("PATH", os.defpath))
        return launch_of(plugin).argv, env

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            self.show("log", line.decode(errors="replace").rstrip())

    async def _serving(self, target: Target, name: str) -> bool:
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.returncode is not None:
                return False
            inbox = target.operator.new_inbox()
            sub = await target.operator.subscribe(inbox)
            try:
                await target.operator.publish(f"$SRV.PING.{name}", b"", reply=inbox)
                with contextlib.suppress(TimeoutError):
                    msg = await sub.next_msg(timeout=0.3)
                    if msg.data:
                        return True
            finally:
                await sub.unsubscribe()
            await asyncio.sleep(0.1)
        return False

    async def _emit(self, target: Target) -> None:
        from tuxpilot.bus.connect import publish_event

        assert self.emit is not None
        event = Event.new(self.emit.type, target.subjects.host, source="dev", data=self.emit.data,
                          value=self.emit.value, resource=self.emit.resource)
        await publish_event(target.operator, target.subjects, event)
        self.show("dev", f"emitted {event.type} ({event.id})")

    async def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: node's or a build's children go too
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

