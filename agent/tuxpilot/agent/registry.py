"""The plugin registry: plugins announce their manifests in a JetStream KV bucket; the agent watches it.

Keys are `<host>.<plugin>`; the value is the manifest and the announcing instance. Liveness is asked of
the NATS micro discovery (`$SRV.PING.<plugin>`), so a crashed plugin shows as registered but not live.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from tuxpilot.bus.registry import open_bucket
from tuxpilot.lifetime import Part
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.names import Subjects, registry_key
from tuxpilot.protocol.registry import RegistryEntry

log = structlog.get_logger("tuxpilot.registry")


def _parse(value: bytes | None) -> Manifest | None:
    if not value:
        return None
    try:
        return RegistryEntry.from_json(value).manifest
    except TuxPilotError as exc:
        log.warning("registry.bad_entry", error=exc.message)
        return None


class Registry(Part):
    """The manifests announced for one host, kept current by a KV watch."""

    def __init__(self, nc: Client, subjects: Subjects):
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects
        self._manifests: dict[str, Manifest] = {}
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._kv = await open_bucket(self._js, self._subjects)
        self._watcher = await self._kv.watch(registry_key(self._subjects.host, "*"))
        self._task = asyncio.create_task(self._follow(self._watcher), name="registry-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial replay
                continue
            plugin = entry.key.split(".", 1)[1]
            manifest = _parse(entry.value) if entry.operation is None else None
            if manifest is None:
                self._manifests.pop(plugin, None)
                log.info("registry.removed", plugin=plugin)
            else:
                known = self._manifests.get(plugin)
                self._manifests[plugin] = manifest
                if known is None or known.version != manifest.version:
                    log.info("registry.announced", plugin=plugin, version=manifest.version)

    def cached(self, plugin: str) -> Manifest | None:
        return self._manifests.get(plugin)

    async def get(self, plugin: str) -> Manifest | None:
        """The manifest of `plugin`; on a miss asks the bucket, which the watch may not have caught up with."""
        found = self._manifests.get(plugin)
        if found is not None or self._kv is None:
            return found
        try:
            entry = await self._kv.get(registry_key(self._subjects.host, plugin))
        except KeyNotFoundError:
            return None
        manifest = _parse(entry.value)
        if manifest is not None:
            self._manifests[plugin] = manifest
        return manifest

    def names(self) -> list[str]:
        return sorted(self._manifests)
