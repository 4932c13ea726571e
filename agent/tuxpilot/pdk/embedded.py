"""One plugin folder on a private embedded TuxPilot: a real nats-server and a real agent (generated users,
the gate, the plugin host running only that plugin, no monitor), with two clients as the protocol's
parties see it: `gate` (the agent's user, the only one that may publish on exec subjects) and `operator`.

`plugin test` checks a plugin on it, `plugin dev` runs one on it when no `tuxpilot up` is running, and
`plugin test --replay` replays a fleet's events through it in shadow mode (the gate keeps everything dry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from tuxpilot.protocol import launch
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, new_id
from tuxpilot.protocol.names import ACTION_ID_HEADER, MSG_ID_HEADER, Names, Subjects, plugin_consumer_name

HOST = "pdk"
START_TIMEOUT_S = 60.0  # a JavaScript plugin's first start installs its dependencies


@dataclass
class Embedded:
    """The running agent and its clients; `manifest` is the plugin's, as the agent loaded it."""

    agent: Any  # tuxpilot.agent.app.Agent (imported when started: the agent is heavy to import)
    gate: Client
    operator: Client
    manifest: Manifest
    folder: Path
    state_dir: Path
    subjects: Subjects
    names: Names = field(init=False)

    def __post_init__(self) -> None:
        self.names = Names.of(self.subjects)

    @property
    def url(self) -> str:
        return str(self.agent.url)

    @property
    def name(self) -> str:
        return self.manifest.name

    async def request(self, action: str, body: bytes | dict[str, Any] = b"", *, action_id: str | None = None,
                      timeout_s: float = 10.0) -> Msg:
        """A request on the plugin's private exec subject, as the gate sends it (with an action id)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.gate.request(self.subjects.exec(self.name, action), raw, timeout=timeout_s,
                                       headers={ACTION_ID_HEADER: action_id or new_id()})

    async def publish_event(self, event: Event) -> int:
        """Store an event in the events stream on this host's subject; its stream sequence."""
        ack = await self.gate.jetstream().publish(self.subjects.event(event.type), event.to_json(),
                                                  headers={MSG_ID_HEADER: event.id})
        return int(ack.seq)

    async def publish_raw(self, event_type: str, body: bytes) -> int:
        """Bytes stored where an event of `event_type` would be; their stream sequence."""
        ack = await self.gate.jetstream().publish(self.subjects.event(event_type), body)
        return int(ack.seq)

    async def consumer(self) -> ConsumerInfo:
        """The plugin's durable consumer, as the server sees it."""
        info: ConsumerInfo = await self.operator.jetstream().consumer_info(
            self.names.events, plugin_consumer_name(self.name, self.subjects.host))
        return info

    async def discover(self, verb: str, wait: float = 0.5) -> list[dict[str, Any]]:
        """Every answer to `$SRV.<verb>.<plugin>` within `wait` seconds."""
        inbox = self.operator.new_inbox()
        sub = await self.operator.subscribe(inbox)
        answers: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        try:
            await self.operator.publish(f"$SRV.{verb}.{self.name}", b"", reply=inbox)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                if msg.data:  # not the server's "no responders" status
                    with contextlib.suppress(ValueError):
                        answers.append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        return answers

    async def wait_serving(self, limit_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        """The plugin's PING answer once it serves; Unavailable (with the host's last word on it) if it
        does not within `limit_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while True:
            answers = await self.discover("PING", wait=0.2)
            if answers:
                return answers[0]
            if loop.time() > deadline:
                raise TuxPilotError(f"{self.name} did not answer $SRV.PING within {limit_s:.0f} s"
                                    f"{self._host_state()}", code="unavailable")

    def supervised(self) -> Any:
        """The plugin host's record of the plugin (runtimes.host.Supervised): restarts, last exit, plan."""
        host = self.agent.host
        return host.plugins.get(self.name) if host is not None else None

    def _host_state(self) -> str:
        sup = self.supervised()
        if sup is None:
            return ""
        refused = sup.plan.refused if sup.plan is not None else None
        if refused:
            return f": refused, {refused}"
        if sup.last_exit is not None:
            return f": it exited ({sup.last_exit}) {sup.restarts} time(s)"
        return ""


async def connect_as(url: str, state_dir: Path, user: str, name: str) -> Client:
    """A client with a generated user's credential file."""
    from tuxpilot.bus import auth

    creds = launch.CredentialFile.model_validate_json(auth.credential_file(state_dir, user).read_text())
    return await nats.connect(url, user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix,
                              allow_reconnect=False, name=name)


def environment(folder: Path, state_dir: Path, *, host: str, dry_run: bool, ack_wait_s: float,
                backoff_s: float, run: bool = True, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The agent's whole configuration, as variables: nothing from the user's config file or environment.
    With `run`, its plugin host runs the plugin; without, it runs nothing (the plugin is loaded by hand,
    agent control `load_plugin`, as `plugin dev` does)."""
    manifest = load_manifest(folder)
    return {
        launch.HOST_ID: host,
        launch.STATE_DIR: str(state_dir),
        "TUXPILOT_PLUGIN_DIRS": str(folder) if run else "[]",
        "TUXPILOT_RUN_PLUGINS": manifest.name if run else "[]",
        "TUXPILOT_MONITOR_ENABLED": "false",
        "TUXPILOT_GATE_DRY_RUN": "true" if dry_run else "false",
        "TUXPILOT_STREAMS_ACK_WAIT_S": str(ack_wait_s),
        "TUXPILOT_STREAMS_BACKOFF_S": json.dumps([backoff_s]),
        **(extra or {}),
    }


@contextlib.asynccontextmanager
async def embedded(
    folder: Path,
    *,
    host: str = HOST,
    dry_run: bool = True,
    ack_wait_s: float = 1.0,
    backoff_s: float = 2.0,
    extra: dict[str, str] | None = None,
    run: bool = True,
) -> AsyncIterator[Embedded]:
    """Start the server and agent for the plugin in `folder`; with `run`, its host runs the plugin and this
    returns once it answers PING. Everything (server, agent, plugin process, state folder) is gone on exit."""
    from tuxpilot.agent.app import Agent
    from tuxpilot.agent.config import load_config
    from tuxpilot.bus import auth

    folder = folder.resolve()  # noqa: ASYNC240 - once, before anything runs
    manifest = load_manifest(folder)
    with tempfile.TemporaryDirectory(prefix="tuxpilot-pdk-") as tmp:
        state = Path(tmp) / "state"
        config = load_config(environ=environment(folder, state, host=host, dry_run=dry_run, ack_wait_s=ack_wait_s,
                                                  backoff_s=backoff_s, run=run, extra=extra))
        subjects = Subjects.of(config)
        if run:
            from tuxpilot.agent.app import host_plugins

            found = host_plugins(config).plugins.get(manifest.name)
            if found is not None and found.problem is not None:  # the agent would not start it: say why now
                raise ConfigError(f"{manifest.name} cannot run on this host: {found.problem}")
        agent = Agent(config)
        await agent.start()
        gate = operator = None
        try:
            gate = await connect_as(agent.url, state, auth.agent_user(subjects).name, "tuxpilot-pdk-gate")
            operator = await connect_as(agent.url, state, auth.operator_user(subjects).name, "tuxpilot-pdk")
            rig = Embedded(agent, gate, operator, manifest, folder, state, subjects)
            if run:
                await rig.wait_serving()
            yield rig
        finally:
            for client in (gate, operator):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close()
            await agent.stop()
