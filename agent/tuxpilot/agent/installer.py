"""Plugins installed, updated and removed by the agent, on its operator's request: `P.agent.H.install`,
`update` and `remove`, which nats-server lets only the host's operator send (on a fleet's host also the
fan-out `P.fleet.agent.<verb>`, which only the fleet's admin may send).

The agent takes nothing on the requester's word. It verifies the package itself against the host's trusted
publisher keys (never the CLI's verification), checks its `api_version` and dependencies, unpacks it into
`<state dir>/installed/<name>/<version>`, installs its JavaScript dependencies or has wasmtime check its
WebAssembly module, then runs it like any local plugin (its own NATS user, durable consumer and registry entry) without
a restart. A dangerous permission the manifest asks for is granted only when the request names it. The new
plugin must come up healthy: its micro service answers `$SRV.PING.<name>` with the new version within the
deadline. An install that does not is undone; an update is rolled back to the old version's files, user
and consumer (back where the old version left it), and the old version runs again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tuxpilot.agent import installed, packages
from tuxpilot.agent.config import Config, edit_grants, forget_grants
from tuxpilot.agent.handrun import answer
from tuxpilot.bus.registry import instances_of
from tuxpilot.bus.streams import delete_plugin_consumer, plugin_consumer_floor, rewind_plugin_consumer
from tuxpilot.fleet.targets import Targets
from tuxpilot.lifetime import Part
from tuxpilot.protocol.errors import BadRequest, Conflict, NotFound, TuxPilotError
from tuxpilot.protocol.manifest import DANGEROUS, SEMVER, Manifest, Permission
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.names import HOST_HEADER
from tuxpilot.runtimes.catalog import runtime_of
from tuxpilot.runtimes.loader import Installed, plugin_path
from tuxpilot.settings import default_config_path

if TYPE_CHECKING:
    from tuxpilot.agent.app import Agent

log = structlog.get_logger("tuxpilot.installer")

INSTALL, UPDATE, REMOVE = "install", "update", "remove"
HEALTH_POLL_S = 0.3
TOKEN = re.compile(r"^[a-z0-9_-]{1,64}$")
VERSION = re.compile(SEMVER)


def host_plugins(config: Config) -> Installed:
    from tuxpilot.agent.app import host_plugins as of  # the agent's module imports this one

    return of(config)


class Unhealthy(TuxPilotError):
    """The new plugin did not start, or did not answer its health check in time."""

    code = "unhealthy"


@dataclass(frozen=True)
class Request:
    """An install or update request as the agent reads it: a package (its bytes), or a name and optional
    version to fetch from a registry; and the dangerous permissions the operator grants."""

    package: bytes | None = None
    name: str | None = None
    version: str | None = None
    registry: str | None = None
    grant: tuple[Permission, ...] = ()

    @classmethod
    def parse(cls, raw: bytes, limit: int) -> Request:
        if len(raw) > limit:
            raise BadRequest(f"request of {len(raw)} bytes is larger than {limit}: publish the package to a "
                             "registry and install it by name")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise TypeError
            package = base64.b64decode(doc["package"], validate=True) if doc.get("package") is not None else None
            grant = tuple(Permission(p) for p in doc.get("grant") or [])
            name, version, registry = (doc.get(k) for k in ("name", "version", "registry"))
        except (ValueError, TypeError, binascii.Error):
            raise BadRequest('give {"package": "<base64>"} or {"name": "NAME", "version": "X.Y.Z"}, and '
                             f'optionally "grant": [permission, …] (permissions: {", ".join(Permission)})') from None
        checks = ((name, "name", TOKEN), (version, "version", VERSION), (registry, "registry", TOKEN))
        for value, what, pattern in checks:
            if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
                raise BadRequest(f"{what} {value!r} is not a plugin {what}")
        if package is None and name is None:
            raise BadRequest('give {"package": "<base64>"} or {"name": "NAME"}')
        return cls(package, name, version, registry, grant)


@dataclass(frozen=True)
class Staged:
    """A package the agent verified itself and unpacked into its version folder, ready to run."""

    folder: Path
    manifest: Manifest
    record: installed.Record


class Installer(Part):
    """Serves the install, update and remove verbs for one agent; one operation at a time, and none
    while the agent applies a config change to its plugins (they share the agent's plugins lock)."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.config = agent.config
        self.subjects = agent.subjects
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        nc = self.agent.nc
        assert nc is not None
        work: dict[str, Callable[[bytes], Awaitable[dict[str, Any]]]] = {
            INSTALL: self.install, UPDATE: self.update, REMOVE: self.remove,
        }
        for verb, handler in work.items():
            self._subs.append(await nc.subscribe(self.subjects.agent_control(verb), cb=self._local(handler)))
            if self.config.fleet.enrollment is not None:  # the fleet's admin reaches every targeted host at once
                self._subs.append(await nc.subscribe(self.subjects.fleet_agent(verb), cb=self._fleet(handler)))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    def _local(self, work: Callable[[bytes], Awaitable[dict[str, Any]]]) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            assert self.agent.nc is not None
            await answer(self.agent.nc, msg, work)
        return on_msg

    def _fleet(self, work: Callable[[bytes], Awaitable[dict[str, Any]]]) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            assert self.agent.nc is not None
            try:
                targets = Targets.of_headers(msg.headers)
            except TuxPilotError:
                return  # a malformed target matches no one
            if targets.match(self.subjects.host, self.config.fleet.labels):
                await answer(self.agent.nc, msg, work, headers={HOST_HEADER: self.subjects.host})
        return on_msg

    @property
    def _limit(self) -> int:
        nc = self.agent.nc
        return nc.max_payload if nc is not None and nc.max_payload else 1024 * 1024

    # -- the verbs ----------------------------------------------------------------------------------

    async def install(self, raw: bytes) -> dict[str, Any]:
        request = Request.parse(raw, self._limit)
        async with self.agent.plugins_lock, self._incoming() as incoming:
            staged = await self._stage(request, incoming, updating=False)
            name, manifest = staged.manifest.name, staged.manifest
            # Whatever an earlier plugin of this name was granted goes: the manifest's default applies.
            self._forget_grants(name)
            try:
                await self.agent.start_plugin(name, staged.folder, manifest)
                why = await self._health(name, manifest.version)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                await self.agent.stop_plugin(name)
                await self.agent.forget_plugin(name)
                await self._uninstall(staged.folder, manifest)
                installed.discard(installed.plugin_dir(self.config.state_dir, name))
                log.error("install.failed", plugin=name, version=manifest.version, why=why)
                raise Unhealthy(f"{name} {manifest.version} did not come up: {why}; nothing was installed")
            records = installed.read(self.config.state_dir)
            records[name] = staged.record
            installed.write(self.config.state_dir, records)
            granted = self._grant(manifest, request.grant)
        log.info("install.done", plugin=name, version=manifest.version, granted=granted,
                 publisher=staged.record.publisher)
        return self._reply(staged, granted, previous=None)

    async def update(self, raw: bytes) -> dict[str, Any]:
        request = Request.parse(raw, self._limit)
        async with self.agent.plugins_lock, self._incoming() as incoming:
            staged = await self._stage(request, incoming, updating=True)
            name, manifest = staged.manifest.name, staged.manifest
            old = self._installed(name)
            old_folder = old.folder(self.config.state_dir)
            old_manifest = await asyncio.to_thread(load_manifest, old_folder)
            assert self.agent.nc is not None
            floor = await plugin_consumer_floor(self.agent.nc.jetstream(), old_manifest, self.subjects)
            await self.agent.stop_plugin(name)
            try:
                await self.agent.start_plugin(name, staged.folder, manifest)
                why = await self._health(name, manifest.version)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                back = await self._roll_back(old_manifest, old_folder, staged, floor)
                log.error("update.rolled_back", plugin=name, version=manifest.version, kept=old.version, why=why,
                          old_healthy=back is None)
                raise Unhealthy(
                    f"{name} {manifest.version} did not come up: {why}; rolled back to {old.version}"
                    + ("" if back is None else f", which did not come up either: {back}"),
                    details={"rolled_back": True, "version": old.version, "tried": manifest.version},
                )
            records = installed.read(self.config.state_dir)
            records[name] = staged.record
            installed.write(self.config.state_dir, records)
            await self._uninstall(old_folder, old_manifest)
            await asyncio.to_thread(installed.discard, old_folder)
            if old_manifest.subscribes and not manifest.subscribes:  # the new version reads no events
                await delete_plugin_consumer(self.agent.nc.jetstream(), name, self.subjects)
            granted = self._grant(manifest, request.grant)
        log.info("update.done", plugin=name, version=manifest.version, previous=old.version, granted=granted)
        return self._reply(staged, granted, previous=old.version)

    async def remove(self, raw: bytes) -> dict[str, Any]:
        try:
            name = json.loads(raw)["name"]
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise BadRequest('give {"name": "NAME"}') from None
        async with self.agent.plugins_lock:
            record = self._installed(name)  # its manifest is not needed: a broken one is removed all the same
            await self.agent.stop_plugin(name)
            await self.agent.forget_plugin(name)
            folder = installed.version_dir(self.config.state_dir, name, record.version)
            image = None
            with contextlib.suppress(TuxPilotError, OSError):  # a broken manifest: nothing more of it is known
                manifest = await asyncio.to_thread(load_manifest, folder)
                await self._uninstall(folder, manifest)
                image = manifest.image
            records = installed.read(self.config.state_dir)
            records.pop(name, None)
            installed.write(self.config.state_dir, records)
            await asyncio.to_thread(installed.discard, installed.plugin_dir(self.config.state_dir, name))
            # Its working dir holds what the plugin wrote for itself: a later install starts afresh.
            await asyncio.to_thread(shutil.rmtree, self.config.state_dir / "plugins" / name, True)
            self._forget_grants(name)
        log.info("remove.done", plugin=name, version=record.version)
        return {"plugin": name, "version": record.version, "removed": True} | ({"image": image} if image else {})

    # -- steps --------------------------------------------------------------------------------------

    def _installed(self, name: str) -> installed.Record:
        record = installed.read(self.config.state_dir).get(name)
        if record is None:
            where = self.agent.running_plugins().get(name)
            also = f" (plugin {name} runs from {where[0]}, which no package installed)" if where else ""
            raise NotFound(f"no plugin named {name!r} was installed from a package on this host{also}")
        return record

    def _taken(self, name: str) -> None:
        """A package may not take the name of a plugin the host has from elsewhere: it would inherit that
        plugin's grants, credentials and consumer."""
        found = host_plugins(self.config)
        known = found.plugins.get(name)
        by_hand = self.agent.handrun.loaded.get(name) if self.agent.handrun is not None else None
        if known is not None and name not in installed.read(self.config.state_dir):
            raise Conflict(f"this host already has a plugin named {name!r} in {known.folder}; a package may not "
                           "take its name")
        if by_hand is not None:
            raise Conflict(f"plugin {name!r} runs by hand from {by_hand[0]}; a package may not take its name")

    async def _stage(self, request: Request, incoming: Path, *, updating: bool) -> Staged:
        """Fetch, verify, check and unpack the package; its runtime prepared. Refuses before writing anything
        to the installed tree."""
        current = self._installed(request.name) if updating and request.name else None
        verified, source = await packages.obtain(self.config, request, incoming, current, self.agent.nc)
        manifest = verified.manifest
        name = manifest.name
        if request.name is not None and request.name != name:
            raise BadRequest(f"the package holds plugin {name!r}, not {request.name!r}")
        if updating:
            current = self._installed(name)
            if manifest.version == current.version:
                raise Conflict(f"{name} {current.version} is installed already")
        elif name in installed.read(self.config.state_dir):
            version = installed.read(self.config.state_dir)[name].version
            raise Conflict(f"{name} {version} is installed already: `tuxpilot plugin update {name}` replaces it")
        self._taken(name)
        unasked = [p.value for p in request.grant if p not in manifest.permissions]
        if unasked:
            raise BadRequest(f"{name} does not ask for {', '.join(unasked)} (it asks for: "
                             f"{', '.join(p.value for p in manifest.permissions) or 'nothing'})")
        # Unpacked into the scratch folder first: nothing reaches the installed tree before every check passed.
        scratch = await asyncio.to_thread(packages.unpack, verified, incoming / "plugin")
        others = {n: f.manifest for n, f in host_plugins(self.config).plugins.items() if f.manifest is not None}
        problems = await asyncio.to_thread(packages.check_dependencies, manifest, scratch, others)
        if problems:
            raise packages.refused(f"{name} {manifest.version}: {'; '.join(problems)}")
        folder = installed.version_dir(self.config.state_dir, name, manifest.version)
        if folder.exists():  # left by an operation that died half-way: never the version in force (checked above)
            await asyncio.to_thread(installed.discard, folder)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        scratch.rename(folder)
        try:
            await asyncio.to_thread(installed.seal, folder)
            await self._prepare(folder, manifest)
        except BaseException:
            await asyncio.to_thread(installed.discard, folder if current else folder.parent)
            raise
        record = installed.Record(
            name=name, version=manifest.version, sha256=verified.sha256, signed=verified.signed,
            publisher=verified.publisher, source=source, installed_at=datetime.now(UTC).isoformat(),
            trusted=verified.trusted,
        )
        return Staged(folder, manifest, record)

    async def _prepare(self, folder: Path, manifest: Manifest) -> None:
        """Its JavaScript dependencies installed from its lockfile (no install scripts); then whatever its runtime
        still lacks here (a WebAssembly module wasmtime refuses, say) refuses the install."""
        runtime = runtime_of(manifest)
        await runtime.install(folder, manifest, log.bind(plugin=manifest.name))
        lacking = await asyncio.to_thread(runtime.missing, folder, manifest, plugin_path())
        if lacking is not None:
            raise Unhealthy(f"runtime {runtime.name} cannot run {manifest.name} here: {lacking}")

    async def _uninstall(self, folder: Path, manifest: Manifest) -> None:
        """What the version in `folder` made outside it (a container plugin's image) goes with it."""
        await runtime_of(manifest).uninstall(folder, manifest, log.bind(plugin=manifest.name))

    async def _health(self, name: str, version: str) -> str | None:
        """None once an instance of the plugin answers `$SRV.PING.<name>` (only its own NATS user may) with
        `version`; else why not, as soon as its process exits or at the deadline."""
        nc, host = self.agent.nc, self.agent.host
        assert nc is not None
        limit = self.config.install.health_timeout_s
        deadline = time.monotonic() + limit
        seen: set[str] = set()
        while True:
            failure = host.failure(name) if host is not None else "no plugin host"
            if failure is not None:
                return failure
            for found in await instances_of(nc, name, self.subjects.host, wait=HEALTH_POLL_S):
                if found.get("version") == version:
                    return None
                seen.add(str(found.get("version")))
            if time.monotonic() > deadline:
                answered = f" (answered: version {', '.join(sorted(seen))})" if seen else ""
                return f"no instance answered $SRV.PING.{name} with version {version} within {limit:g} s{answered}"

    async def _roll_back(self, manifest: Manifest, folder: Path, tried: Staged, floor: int | None) -> str | None:
        """The old version again: its files (never touched), its user's permissions, its registry entry, and its
        consumer where it was (what the tried version acknowledged is delivered again); None when it comes up
        healthy."""
        await self.agent.stop_plugin(manifest.name)
        await self._uninstall(tried.folder, tried.manifest)
        await asyncio.to_thread(installed.discard, tried.folder)
        if floor is not None and self.agent.nc is not None:
            await rewind_plugin_consumer(self.agent.nc.jetstream(), manifest, self.subjects, self.config.streams,
                                         history=self.config.plugin(manifest.name).history, floor=floor)
        try:
            await self.agent.start_plugin(manifest.name, folder, manifest)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return await self._health(manifest.name, manifest.version)

    def _grant(self, manifest: Manifest, grant: tuple[Permission, ...]) -> list[str]:
        """The permissions in force after an install (its non-dangerous ones and those named) or an update
        (what was granted, and those named)."""
        settings = self.config.plugin(manifest.name)
        current = settings.granted(manifest)
        if not grant:
            return sorted(p.value for p in current)
        path = self.config.source or default_config_path()
        granted = edit_grants(path, manifest, current, add=list(grant), remove=[])
        # In force now, before the config watch reads the file again.
        self.config.plugins[manifest.name] = settings.model_copy(update={"permissions": granted})
        return [p.value for p in granted]

    def _forget_grants(self, name: str) -> None:
        forget_grants(self.config.source or default_config_path(), name)
        self.config.plugins.pop(name, None)

    def _reply(self, staged: Staged, granted: list[str], previous: str | None) -> dict[str, Any]:
        manifest = staged.manifest
        dangerous = sorted(p.value for p in manifest.permissions if p in DANGEROUS)
        return {
            "plugin": manifest.name, "version": manifest.version, "previous": previous,
            "folder": str(staged.folder), "sha256": staged.record.sha256, "signed": staged.record.signed,
            "trusted": staged.record.trusted,
            "publisher": staged.record.publisher, "source": staged.record.source,
            "permissions": [p.value for p in manifest.permissions], "dangerous": dangerous,
            "granted": granted, "not_granted": [p for p in dangerous if p not in granted],
        }

    @contextlib.asynccontextmanager
    async def _incoming(self) -> AsyncIterator[Path]:
        """A private scratch folder for the package being installed, deleted afterwards."""
        base = installed.root(self.config.state_dir)
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
        folder = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
        try:
            yield folder
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
