"""The plugin registry: the manifests this host loaded itself, and the registry bucket written from them.

The gate decides only from these manifests (local files the agent read and validated), never from
anything a plugin announces. The registry bucket (`<host>.<plugin>` keys) is information for
`status` and the CLI, written by the agent on each local plugin's behalf; plugins may not write it.
A running plugin announces itself through its micro service's `$SRV.INFO` metadata, which says who
is running, not what the gate allows.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from nats.aio.client import Client

from tuxpilot.bus.registry import open_bucket
from tuxpilot.lifetime import Part
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.names import Subjects, registry_key
from tuxpilot.protocol.registry import RegistryEntry

log = structlog.get_logger("tuxpilot.registry")


class Registry(Part):
    """The manifests one host loaded; `start` writes the entries of the plugins it runs into the bucket."""

    def __init__(self, nc: Client, subjects: Subjects, manifests: Mapping[str, Manifest],
                 running: Mapping[str, Manifest] | None = None):
        self._nc = nc
        self._subjects = subjects
        self._manifests = dict(manifests)
        self._running = dict(manifests if running is None else running)

    async def start(self) -> None:
        for manifest in sorted(self._running.values(), key=lambda m: m.name):
            await self._write(manifest)

    async def add(self, manifest: Manifest) -> None:
        """A plugin the agent loaded while running (started by a config change, or run by hand)."""
        self._manifests[manifest.name] = self._running[manifest.name] = manifest
        await self._write(manifest)

    async def remove(self, plugin: str) -> None:
        """A plugin removed from the host: the gate no longer knows it, its entry leaves the bucket."""
        self._manifests.pop(plugin, None)
        self._running.pop(plugin, None)
        kv = await open_bucket(self._nc.jetstream(), self._subjects)
        await kv.delete(registry_key(self._subjects.host, plugin))
        log.info("registry.removed", plugin=plugin)

    async def _write(self, manifest: Manifest) -> None:
        kv = await open_bucket(self._nc.jetstream(), self._subjects)
        entry = RegistryEntry.of(self._subjects.host, manifest)
        await kv.put(registry_key(self._subjects.host, manifest.name), entry.to_json())
        log.info("registry.written", plugin=manifest.name, version=manifest.version)

    def get(self, plugin: str) -> Manifest | None:
        """The manifest of `plugin` as this host loaded it, or None."""
        return self._manifests.get(plugin)

    def names(self) -> list[str]:
        return sorted(self._manifests)

    def all(self) -> dict[str, Manifest]:
        return dict(self._manifests)
