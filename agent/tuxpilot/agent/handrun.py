"""Plugins run by hand (`tuxpilot plugin run PATH`) against the local agent.

On its operator's request (`<prefix>.agent.<host>.load_plugin`, which nats-server lets only the
operator send) the agent loads the folder's manifest itself — the gate decides only from manifests the
host loaded, never from what a plugin says of itself — then gives the plugin a NATS user of its own on
the embedded server (the server reloads its authorization; nobody is disconnected), creates its durable
consumer and registry entry, and answers with the credential file the plugin connects with. The user
lasts as long as this agent: after a restart, `plugin run` asks again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from tuxpilot.agent.config import Config
from tuxpilot.bus import auth
from tuxpilot.bus.server import NatsServer
from tuxpilot.bus.streams import create_plugin_consumer
from tuxpilot.protocol.errors import BadRequest, TuxPilotError, Unavailable, error_doc
from tuxpilot.protocol.manifest import MANIFEST_FILE, Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.names import Subjects

log = structlog.get_logger("tuxpilot.handrun")

LOAD_PLUGIN = "load_plugin"
MAX_REQUEST_BYTES = 16 * 1024


class Conflict(TuxPilotError):
    code = "conflict"


def _read(folder: Path) -> tuple[Path, Manifest]:
    """The folder (resolved) and its manifest, read by the agent itself."""
    if not folder.is_absolute() or not (folder / MANIFEST_FILE).is_file():
        raise BadRequest(f"{folder}: not an absolute path to a folder holding {MANIFEST_FILE}")
    return folder.resolve(), load_manifest(folder)


async def answer(nc: Client, msg: Msg, work: Callable[[bytes], Awaitable[dict[str, Any]]],
                 headers: dict[str, str] | None = None) -> None:
    """Answer an operator's request to the agent with what `work` returns, or with an `error` document (and
    the micro error headers) when it raises; `headers` go on either reply."""
    extra = dict(headers or {})
    try:
        reply: dict[str, Any] = await work(msg.data)
    except Exception as exc:
        if not isinstance(exc, TuxPilotError):
            log.exception("agent_control.failed", subject=msg.subject)
        reply = error_doc(exc)
        status = exc.status if isinstance(exc, TuxPilotError) else 500
        extra |= {ERROR_HEADER: reply["message"][:256], ERROR_CODE_HEADER: str(status)}
    if msg.reply:
        await nc.publish(msg.reply, json.dumps(reply).encode(), headers=extra or None)


class HandRun:
    """Loads plugin folders for `plugin run` on request; one per agent."""

    def __init__(
        self,
        nc: Client,
        config: Config,
        server: NatsServer | None,
        running: dict[str, tuple[Path, Manifest]],
        on_loaded: Callable[[Manifest], Awaitable[None]],
    ):
        self.nc = nc
        self.config = config
        self.subjects = Subjects.of(config)
        self.server = server
        self.running = running  # the plugins the agent runs itself: name -> (folder, manifest)
        self.on_loaded = on_loaded  # the gate takes the manifest; the registry bucket gets its entry
        self.loaded: dict[str, tuple[Path, Manifest]] = {}  # loaded for `plugin run`
        self._lock = asyncio.Lock()

    @property
    def subject(self) -> str:
        return self.subjects.agent_control(LOAD_PLUGIN)

    async def handle(self, msg: Msg) -> None:
        await answer(self.nc, msg, self.load)

    async def load(self, raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_REQUEST_BYTES:
            raise BadRequest("request too large")
        try:
            request = json.loads(raw)
            folder = Path(request["folder"])
        except (ValueError, KeyError, TypeError):
            raise BadRequest('give {"folder": "/absolute/path/to/the/plugin"}') from None
        folder, manifest = await asyncio.to_thread(_read, folder)
        name = manifest.name
        mine = self.running.get(name)
        if mine is not None and await asyncio.to_thread(mine[0].resolve) != folder:
            raise Conflict(f"this agent runs plugin {name!r} from {mine[0]}; a plugin run by hand may not take "
                           f"its name (rename the plugin in {folder / MANIFEST_FILE})")
        user_file = await self._provision(manifest) if mine is None else self._credential_file(manifest)
        self.loaded[name] = (folder, manifest)
        js = self.nc.jetstream()
        await create_plugin_consumer(js, manifest, self.subjects, self.config.streams,
                                     history=self.config.plugin(name).history)
        await self.on_loaded(manifest)
        log.info("handrun.loaded", plugin=name, folder=str(folder), version=manifest.version)
        return {"plugin": name, "version": manifest.version, "user_file": str(user_file) if user_file else None}

    def _credential_file(self, manifest: Manifest) -> Path | None:
        if self.server is None or not self.config.embedded.auth:
            return None
        return auth.credential_file(self.config.state_dir, auth.plugin_user(self.subjects, manifest).name)

    async def _provision(self, manifest: Manifest) -> Path | None:
        if self.server is None:
            raise Unavailable(
                "this agent does not run its NATS server, so it cannot add a user for a plugin run by hand: "
                "give the plugin credentials of its own (`tuxpilot auth export` writes them for the server's config)"
            )
        return (await self.add_users({manifest.name: manifest})).get(manifest.name)

    async def add_users(self, manifests: dict[str, Manifest]) -> dict[str, Path]:
        """Users for these plugins on the embedded server, next to every user it already has (the server
        reloads its authorization; nobody is disconnected). Their credential files, by plugin; none
        when the agent does not run the server with generated authorization."""
        if self.server is None or not self.config.embedded.auth:
            return {}
        async with self._lock:  # one server reload at a time
            every = {n: m for n, (_, m) in {**self.running, **self.loaded}.items()} | manifests
            users = auth.users_for(self.subjects, every)
            hashes = await asyncio.to_thread(auth.provision, self.config.state_dir, users)
            authorization = auth.server_config(users, hashes)
            # Only when users change: on a reload nats-server forgets which replies it allowed, so a
            # plugin's reply to a request in flight at that instant is refused (the action times out).
            if authorization != self.server.extra_config:
                await asyncio.to_thread(self.server.reload, authorization)
        return {name: path for name, m in manifests.items() if (path := self._credential_file(m)) is not None}

    async def drop_users(self, plugins: list[str]) -> None:
        """The users of these plugins (which no longer run) taken off the embedded server, their passwords
        and credential files deleted."""
        if self.server is None or not self.config.embedded.auth:
            return
        gone = set(plugins)
        async with self._lock:
            every = {n: m for n, (_, m) in {**self.running, **self.loaded}.items() if n not in gone}
            users = auth.users_for(self.subjects, every)
            hashes = await asyncio.to_thread(auth.provision, self.config.state_dir, users)
            await asyncio.to_thread(auth.forget, self.config.state_dir,
                                    [auth.plugin_user_name(self.subjects, n) for n in plugins])
            authorization = auth.server_config(users, hashes)
            if authorization != self.server.extra_config:
                await asyncio.to_thread(self.server.reload, authorization)
