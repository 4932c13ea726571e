"""The plugin host: starts each local plugin as its own process, restarts it with backoff when it dies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.config import Config
from agent.manifest import Manifest
from agent.server import _die_with_parent

log = structlog.get_logger("tuxpilot.host")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 60.0
# A plugin that stayed up this long is healthy again: its backoff starts over.
HEALTHY_AFTER_S = 30.0
# Environment a plugin process keeps from the agent's; everything else is scrubbed.
# The agent's own credentials never pass to a plugin.
AGENT_SECRETS = frozenset(
    {
        "TUXPILOT_NATS_USER",
        "TUXPILOT_NATS_PASSWORD",
        "TUXPILOT_NATS_TOKEN",
        "TUXPILOT_NATS_CREDS",
        "TUXPILOT_NATS_USER_FILE",
    }
)
KEEP_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "DOCKER_HOST")


def backoff(previous: float) -> float:
    return BACKOFF_START_S if previous <= 0 else min(previous * 2, BACKOFF_MAX_S)


def plugin_command(folder: Path, manifest: Manifest) -> list[str]:
    if manifest.runtime == "python":
        return [sys.executable, "-m", "agent.cli", "plugin", "run", str(folder)]
    if manifest.runtime == "javascript":
        return ["node", str(folder / manifest.entry_point)]
    return [str(folder / manifest.entry_point)]


@dataclass
class Supervised:
    """One local plugin and its restart history."""

    name: str
    folder: Path
    manifest: Manifest
    restarts: int = 0
    pid: int | None = None
    delay: float = 0.0
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)


class PluginHost:
    """Runs `config.run_plugins` as child processes until stopped."""

    def __init__(self, config: Config, url: str, plugins: dict[str, tuple[Path, Manifest]]):
        self.config = config
        self.url = url
        self.plugins = {
            name: Supervised(name, folder, manifest) for name, (folder, manifest) in plugins.items()
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Each plugin's own credential file, under generated authorization.
        self.credentials: dict[str, Path] = {}

    def environment(self, plugin: Supervised) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if (k in KEEP_ENV or k.startswith("TUXPILOT_")) and k not in AGENT_SECRETS
        }
        user_file = self.credentials.get(plugin.name)
        if user_file is not None:
            env["TUXPILOT_NATS_USER_FILE"] = str(user_file)
        env.update(
            TUXPILOT_NATS_URL=self.url,
            TUXPILOT_HOST_ID=self.config.host_id,
            TUXPILOT_STATE_DIR=str(self.config.state_dir),
            TUXPILOT_SUBJECT_PREFIX=self.config.subject_prefix,
            TUXPILOT_LOG_LEVEL=self.config.log.level,
            TUXPILOT_LOG_FORMAT=self.config.log.format,
            TUXPILOT_PLUGIN=plugin.name,
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _supervise(self, plugin: Supervised) -> None:
        plog = log.bind(plugin=plugin.name, host=self.config.host_id)
        workdir = self.config.state_dir / "plugins" / plugin.name
        workdir.mkdir(parents=True, exist_ok=True)
        while not self._stopping:
            started = time.monotonic()
            plugin.proc = await asyncio.create_subprocess_exec(
                *plugin_command(plugin.folder, plugin.manifest),
                env=self.environment(plugin),
                cwd=workdir,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            plugin.pid = plugin.proc.pid
            plog.info("plugin.process_started", pid=plugin.pid, restarts=plugin.restarts)
            code = await plugin.proc.wait()
            if self._stopping:
                break
            plugin.delay = 0.0 if time.monotonic() - started > HEALTHY_AFTER_S else backoff(plugin.delay)
            plugin.restarts += 1
            plog.warning("plugin.process_exited", code=code, restart_in_s=plugin.delay, restarts=plugin.restarts)
            await asyncio.sleep(plugin.delay)
