"""The agent process: starts its parts in order and stops them in reverse.

embedded nats-server (when no URL is configured) → connection → registry → gate → monitor → local plugins.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import structlog
from nats.aio.client import Client

from agent import bus
from agent.config import Config
from agent.errors import ConfigError
from agent.gate import Gate
from agent.host import PluginHost
from agent.manifest import Manifest, builtin_dir, discover
from agent.models import Event, Metrics
from agent.monitor import Monitor, Reading
from agent.registry import Registry
from agent.server import NatsServer

log = structlog.get_logger("tuxpilot.agent")


def plugin_dirs(config: Config) -> list[Path]:
    return [*config.plugin_dirs, builtin_dir()]


def local_plugins(config: Config) -> dict[str, tuple[Path, Manifest]]:
    """The plugins `config.run_plugins` names, found in the plugin dirs; a missing one is a config error."""
    found = discover(plugin_dirs(config))
    missing = [name for name in config.run_plugins if name not in found]
    if missing:
        raise ConfigError(f"config key run_plugins: no plugin named {', '.join(missing)} in {plugin_dirs(config)}")
    return {name: found[name] for name in config.run_plugins if config.plugin(name).enabled}


class Agent:
    """One host's agent. `embedded`: start a local nats-server when no URL is configured."""

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
        self.subjects = bus.Subjects.of(config)
        self.embedded = embedded and not config.nats.url
        self.run_plugins = run_plugins
        self.server: NatsServer | None = None
        self.nc: Client | None = None
        self.registry: Registry | None = None
        self.gate: Gate | None = None
        self.monitor: Monitor | None = None
        self.host: PluginHost | None = None
        self.url: str = ""

    async def start(self) -> None:
        cfg = self.config
        plugins = local_plugins(cfg) if self.run_plugins else {}
        if self.embedded:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self.server = NatsServer(
                cfg.state_dir / "nats",
                host=cfg.embedded.host,
                port=cfg.embedded.port,
                sync_interval=cfg.embedded.sync_interval,
            )
            await asyncio.to_thread(self.server.start, cfg.embedded.ready_timeout_s)
            self.url = self.server.url
            bus.url_file(cfg.state_dir).write_text(self.url + "\n")
        else:
            url = bus.local_url(cfg)
            if url is None:
                raise ConfigError("config key nats.url: not set, and no local `tuxpilot up` is running")
            self.url = url
        self.nc = await bus.connect(cfg.nats, self.url, name=f"tuxpilot-agent-{cfg.host_id}")
        self.registry = Registry(self.nc, self.subjects)
        await self.registry.start()
        self.gate = Gate(self.nc, cfg, self.registry)
        await self.gate.start()
        if cfg.monitor.enabled:
            self.monitor = Monitor(
                cfg.monitor, cfg.host_id, self._publish_event, self._publish_metrics, reader=self.reader
            )
            await self.monitor.start()
        if plugins:
            self.host = PluginHost(cfg, self.url, plugins)
            await self.host.start()
        log.info("agent.started", host=cfg.host_id, url=self.url, plugins=sorted(plugins))

    async def _publish_event(self, event: Event) -> None:
        assert self.nc is not None
        await bus.publish_event(self.nc, self.subjects, event)

    async def _publish_metrics(self, metrics: Metrics) -> None:
        assert self.nc is not None
        await self.nc.publish(self.subjects.metrics(), metrics.to_json())

    async def stop(self) -> None:
        """Reverse order; each part's failure to stop is logged and the rest still stop."""
        for part in (self.host, self.monitor, self.gate, self.registry):
            if part is not None:
                try:
                    await part.stop()
                except Exception:
                    log.exception("agent.stop_failed", part=type(part).__name__)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            with contextlib.suppress(OSError):
                bus.url_file(self.config.state_dir).unlink()
        log.info("agent.stopped", host=self.config.host_id)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Start, run until SIGINT or SIGTERM, stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            await self.stop()
