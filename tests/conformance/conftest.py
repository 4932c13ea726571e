"""The hook of the protocol conformance suite: start "a plugin implementation" serving the test manifest
(`plugin.toml` beside this file) the way a host starts any plugin, and talk to it only over a real
nats-server, with the users the agent's generated authorization gives each side.

The suite (`test_*.py` here) is written once, against docs/protocol.md. An SDK joins it by adding one
`Implementation` to IMPLEMENTATIONS: a folder beside this file holding its implementation of the
test plugin, the manifest `runtime` that starts it and its `entry_point`. Every test then runs once
per implementation (`pytest tests/conformance -k python`); nothing else changes.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import load_config
from tuxpilot.bus import auth
from tuxpilot.protocol import launch
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, new_id
from tuxpilot.protocol.names import (
    ACTION_ID_HEADER,
    EVENT_ID_HEADER,
    MSG_ID_HEADER,
    Names,
    Subjects,
    plugin_consumer_name,
)

from tests.conftest import need

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "plugin.toml"
HOST = "conformance-host"
PLUGIN = "conformance"
# The streams settings the suite runs with: an event neither acked nor naked comes back after ACK_WAIT_S;
# a failing handler's event after BACKOFF_S (longer, so that the two can be told apart).
ACK_WAIT_S = 1.0
BACKOFF_S = 2.0


@dataclass(frozen=True)
class Implementation:
    """One SDK's implementation of the test plugin."""

    name: str
    folder: Path  # its files, copied beside the manifest
    runtime: str  # the manifest runtime the host starts it with
    entry_point: str
    programs: tuple[str, ...] = ()  # what must be on PATH to run it (e.g. node)
    build: tuple[str, ...] = ()  # a command run in the copied folder before the host loads it
    manifest_extra: str = ""  # appended to the test manifest
    # What a handler that fails unexpectedly answers: an SDK's exception is `internal`; a wasm guest's
    # trap is `plugin_fault` (docs/protocol.md, error codes).
    crash_error: tuple[str, int] = ("internal", 500)
    image: str | None = None  # runtime container: the image the build makes
    # Only these tests (by function name), when the implementation is another's SDK behind another
    # runtime: what the runtime can break (the launch environment, the manifest it is handed, the way to
    # the bus, large messages, redelivery settings), not the SDK's every rule again.
    subset: tuple[str, ...] = ()


# Two images of SDKs whose every rule the python and javascript implementations check already (all 45
# cases pass in a container too, ~4 s each here): the cases a container can break.
CONTAINER_SUBSET = (
    "test_defaults_are_filled_in_and_an_empty_body_means_no_params",
    "test_params_above_256_kib_are_payload_too_large",
    "test_an_unexpected_failure_has_the_implementations_code",
    "test_a_repeated_action_id_gets_the_first_reply_and_the_handler_runs_once",
    "test_a_reply_larger_than_the_server_takes_is_payload_too_large",
    "test_ping_finds_one_instance_with_the_protocol_metadata",
    "test_info_lists_one_endpoint_per_action_on_its_exec_subject_in_the_plugins_queue_group",
    "test_the_agents_registry_entry_and_the_announcement_agree_with_the_local_manifest",
    "test_an_event_gives_one_stored_proposal_with_its_id_as_message_id",
    "test_a_failing_handlers_event_comes_back_after_the_configured_backoff",
)

IMPLEMENTATIONS = [
    Implementation("python", HERE / "python", runtime="python", entry_point="plugin.py"),
    # The JS SDK (sdk/js), linked as `js/sdk`; the host installs it from js/package-lock.json.
    Implementation("javascript", HERE / "js", runtime="javascript", entry_point="plugin.js", programs=("node", "npm")),
    # C compiled to WebAssembly (guests/c); its counters need the one instance the manifest opts into.
    Implementation("wasm", HERE / "wasm", runtime="wasm", entry_point="plugin.wasm", programs=("clang",),
                   build=("sh", str(HERE / "wasm" / "build.sh"), "plugin.wasm"),
                   manifest_extra="\n[config]\nsandbox_keep_state = true\n", crash_error=("plugin_fault", 502)),
    # The Python implementation shipped as an image (on TuxPilot's, images/build.sh), run by the
    # container runtime on the Docker engine ($DOCKER_HOST).
    Implementation("container", HERE / "container", runtime="container", entry_point="image.tar",
                   programs=("docker",), image="tuxpilot-conformance:dev", subset=CONTAINER_SUBSET,
                   build=("sh", str(HERE / "container" / "build.sh"), "python", "tuxpilot-conformance:dev")),
    # The JavaScript implementation in a container: the node image (FROM scratch + node) and its modules.
    Implementation("container-js", HERE / "container", runtime="container", entry_point="image.tar",
                   programs=("docker", "npm"), image="tuxpilot-conformance-js:dev", subset=CONTAINER_SUBSET,
                   build=("sh", str(HERE / "container" / "build.sh"), "js", "tuxpilot-conformance-js:dev")),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect what an implementation's `subset` leaves out."""
    keep, drop = [], []
    for item in items:
        impl = getattr(getattr(item, "callspec", None), "params", {}).get("implementation")
        if isinstance(impl, Implementation) and impl.subset and getattr(item, "originalname", "") not in impl.subset:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def manifest_text(impl: Implementation) -> str:
    """The test manifest, with the implementation's runtime and entry point."""
    text = MANIFEST.read_text()
    text = re.sub(r'(?m)^runtime = ".*"$', f'runtime = "{impl.runtime}"', text)
    image = f'\nimage = "{impl.image}"' if impl.image else ""
    return re.sub(r'(?m)^entry_point = ".*"$', f'entry_point = "{impl.entry_point}"{image}', text) + impl.manifest_extra


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda impl: impl.name)
def implementation(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The plugin folder of one implementation: its files and the test manifest."""
    impl: Implementation = request.param
    for program in impl.programs:
        need(program, shutil.which(program) is not None, f"{program} is not on PATH")
    folder = tmp_path / "plugins" / PLUGIN
    shutil.copytree(impl.folder, folder, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    (folder / "plugin.toml").write_text(manifest_text(impl))
    if impl.build:
        subprocess.run([*impl.build], cwd=folder, check=True, timeout=300)
    return folder


@dataclass
class Bus:
    """The running agent (with its host running the implementation) and two clients: `gate`, connected
    as the agent's user (the only one nats-server lets publish on exec subjects), and `operator`."""

    agent: Agent
    gate: Client
    operator: Client
    manifest: Manifest
    subjects: Subjects = field(default_factory=lambda: Subjects("tuxpilot", HOST))
    # Proposals the plugin handed to the gate by request, seen by the agent's user beside the gate.
    handed: list[Msg] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names.of(self.subjects)

    async def request(
        self,
        action: str,
        body: bytes | dict[str, Any] = b"",
        *,
        action_id: str | None = None,
        event_id: str | None = None,
        timeout: float = 10.0,
    ) -> Msg:
        """A request on the plugin's exec subject, as the gate sends it (always with an action id)."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {ACTION_ID_HEADER: action_id or new_id()}
        if event_id is not None:
            headers[EVENT_ID_HEADER] = event_id
        return await self.gate.request(self.subjects.exec(PLUGIN, action), raw, timeout=timeout, headers=headers)

    async def publish_event(self, name: str, data: dict[str, Any] | None = None) -> Event:
        event = Event.new(f"{PLUGIN}.{name}", HOST, source="agent", data=data or {})
        await self.gate.jetstream().publish(
            self.subjects.event(event.type), event.to_json(), headers={MSG_ID_HEADER: event.id}
        )
        return event

    async def publish_raw_event(self, name: str, body: bytes) -> int:
        """Bytes stored in the events stream as an event would be; their stream sequence."""
        ack = await self.gate.jetstream().publish(self.subjects.event(f"{PLUGIN}.{name}"), body)
        return ack.seq

    async def consumer(self) -> ConsumerInfo:
        """The plugin's durable consumer, as the server sees it."""
        return await self.operator.jetstream().consumer_info(self.names.events, plugin_consumer_name(PLUGIN, HOST))

    async def proposals(self) -> list[Msg]:
        """Every proposal of the plugin that reached the gate: those stored in the proposals stream and
        those handed over by request (seen since the rig started)."""
        return [*await self.stored(self.subjects.proposal(PLUGIN), self.names.proposals), *self.handed]

    async def records(self, event_id: str) -> list[dict[str, Any]]:
        """The audit records of the plugin's actions proposed for one event."""
        docs = [json.loads(m.data) for m in await self.stored(self.subjects.results(HOST), self.names.audit)]
        return [d for d in docs if d.get("event_id") == event_id]

    async def stored(self, subject: str, stream: str) -> list[Msg]:
        """What a stream holds on `subject` (read as the agent: operators may not create consumers)."""
        js = self.gate.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True, stream=stream)
        found: list[Msg] = []
        try:
            while True:
                try:
                    found.append(await sub.next_msg(timeout=0.5))
                except TimeoutError:
                    return found
        finally:
            await sub.unsubscribe()

    async def discover(self, verb: str, wait: float = 0.5) -> list[dict[str, Any]]:
        """Every answer to `$SRV.<verb>.<plugin>` within `wait` seconds."""
        inbox = self.operator.new_inbox()
        sub = await self.operator.subscribe(inbox)
        answers: list[dict[str, Any]] = []
        try:
            await self.operator.publish(f"$SRV.{verb}.{PLUGIN}", b"", reply=inbox)
            deadline = asyncio.get_running_loop().time() + wait
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                if msg.data:  # not the server's "no responders" status
                    answers.append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        return answers


async def _connect(url: str, creds_file: Path) -> Client:
    creds = launch.CredentialFile.model_validate_json(await asyncio.to_thread(creds_file.read_text))
    return await nats.connect(
        url, user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix, allow_reconnect=False
    )


@pytest.fixture
async def bus(implementation: Path, tmp_path: Path) -> AsyncIterator[Bus]:
    """A real agent (embedded nats-server, generated authorization, dry-run gate, no monitor) whose plugin
    host starts the implementation; returns once the plugin answers `$SRV.PING`."""
    state = tmp_path / "state"
    config = load_config(
        environ={
            launch.HOST_ID: HOST,
            launch.STATE_DIR: str(state),
            "TUXPILOT_PLUGIN_DIRS": str(implementation.parent),
            "TUXPILOT_RUN_PLUGINS": PLUGIN,
            "TUXPILOT_MONITOR_ENABLED": "false",
            # The gate records what it would do: the suite's counters see only the suite's own requests.
            "TUXPILOT_GATE_DRY_RUN": "true",
            "TUXPILOT_STREAMS_ACK_WAIT_S": str(ACK_WAIT_S),
            "TUXPILOT_STREAMS_BACKOFF_S": json.dumps([BACKOFF_S]),
        }
    )
    agent = Agent(config)
    await agent.start()
    subjects = Subjects.of(config)
    gate = operator = None
    try:
        gate = await _connect(agent.url, auth.credential_file(state, auth.agent_user(subjects).name))
        operator = await _connect(agent.url, auth.credential_file(state, auth.operator_user(subjects).name))
        rig = Bus(agent, gate, operator, load_manifest(implementation), subjects)

        async def handed(msg: Msg) -> None:
            rig.handed.append(msg)

        await gate.subscribe(subjects.handoff(PLUGIN), cb=handed)
        deadline = asyncio.get_running_loop().time() + 30
        while not await rig.discover("PING", wait=0.2):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the {PLUGIN} plugin did not answer $SRV.PING within 30 s")
        yield rig
    finally:
        for client in (gate, operator):
            if client is not None:
                await client.close()
        await agent.stop()


async def eventually(check: Any, limit: float = 15.0, what: str = "condition") -> Any:
    """Await `check()` until it returns something truthy; that value."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
