"""The broker is the sandbox: a real nats-server with the generated authorization, real connections."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from tuxpilot.agent.config import Config, load_config
from tuxpilot.agent.gate import Gate
from tuxpilot.agent.registry import Registry
from tuxpilot.bus import auth
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer
from tuxpilot.bus.streams import create_plugin_consumer, ensure_streams
from tuxpilot.protocol.manifest import Manifest, builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import NatsConfig

from tests.conftest import tuxpilot_exe
from tests.test_gate import DEMO, demo_plugin, proposal

HOST = "test-host"


class Secured:
    def __init__(self, server: NatsServer, state: Path, users: dict[str, auth.User]):
        self.server, self.state, self.users = server, state, users

    def user_file(self, role: str) -> Path:
        return auth.credential_file(self.state, self.users[role].name)

    async def connect(self, role: str, errors: list[str] | None = None) -> Client:
        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        doc = json.loads(self.user_file(role).read_text())
        return await nats.connect(
            self.server.url,
            user=doc["user"],
            password=doc["password"],
            inbox_prefix=doc["inbox_prefix"],
            error_cb=on_error,
            allow_reconnect=False,
        )


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    subjects = Subjects("tuxpilot", HOST)
    manifests = {"sysmon": load_manifest(builtin_dir() / "sysmon"), "demo": Manifest.from_doc(DEMO)}
    users = auth.users_for(subjects, manifests)
    state = tmp_path / "state"
    hashes = auth.provision(state, users)
    server = NatsServer(tmp_path / "nats", extra_config=auth.server_config(users, hashes)).start()
    by_role = {u.plugin or u.role: u for u in users}
    yield Secured(server, state, by_role)
    server.stop()


def test_credential_files_are_private_and_the_server_config_holds_no_password(
    secured: Secured, tmp_path: Path
) -> None:
    for role in ("agent", "operator", "sysmon", "demo"):
        path = secured.user_file(role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        password = json.loads(path.read_text())["password"]
        assert password not in (tmp_path / "nats" / "nats-server.conf").read_text()
    assert stat.S_IMODE((secured.state / "credentials").stat().st_mode) == 0o700


def test_passwords_survive_a_restart_and_hashes_follow_the_configured_cost(tmp_path: Path) -> None:
    users = auth.users_for(Subjects("tuxpilot", HOST), {})
    first = auth.provision(tmp_path, users)
    passwords = {u.name: u.password for u in users}
    assert all(h.startswith(f"$2b${auth.BCRYPT_ROUNDS:02d}$") for h in first.values())
    # A state dir from a version that hashed at cost 11: same passwords, hashes redone at today's cost.
    store = tmp_path / auth.CREDENTIALS_DIR / auth.AUTH_FILE
    known = json.loads(store.read_text())
    for entry in known.values():
        entry["hash"] = bcrypt.hashpw(entry["password"].encode(), bcrypt.gensalt(11)).decode()
    store.write_text(json.dumps(known))
    again = auth.provision(tmp_path, users)
    assert {u.name: u.password for u in users} == passwords
    for user in users:
        assert again[user.name].startswith(f"$2b${auth.BCRYPT_ROUNDS:02d}$")
        assert bcrypt.checkpw(passwords[user.name].encode(), again[user.name].encode())


async def test_anonymous_and_wrong_password_are_refused(secured: Secured) -> None:
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(secured.server.url, allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(
            secured.server.url, user=secured.users["operator"].name, password="guess", allow_reconnect=False
        )


async def test_plugin_cannot_forge_events_call_other_plugins_or_listen_to_everything(secured: Secured) -> None:
    operator = await secured.connect("operator")
    seen: list[str] = []

    async def spy(msg: Any) -> None:
        seen.append(msg.subject)

    await operator.subscribe("tuxpilot.evt.>", cb=spy)
    await operator.flush()
    # The demo plugin serves its endpoint; sysmon tries to reach it directly.
    demo = await secured.connect("demo")
    calls: list[str] = []

    async def endpoint(msg: Any) -> None:
        calls.append(msg.subject)
        await msg.respond(b'{"status":"ok"}')

    await demo.subscribe("tuxpilot.exec.test-host.demo.echo", queue="demo", cb=endpoint)
    await demo.flush()

    errors: list[str] = []
    sysmon = await secured.connect("sysmon", errors)
    forged = Event.new("disk.low", HOST, source="sysmon")  # sysmon declares no `emits`
    await sysmon.publish("tuxpilot.evt.test-host.disk.low", forged.to_json())
    for subject in ("tuxpilot.exec.test-host.demo.echo", "tuxpilot.act.test-host.demo.echo"):
        with pytest.raises((NatsTimeout, NoRespondersError)):  # denied: no reply ever comes
            await sysmon.request(subject, b"{}", timeout=1)
    await sysmon.subscribe("tuxpilot.>")
    await sysmon.flush()
    await asyncio.sleep(0.3)

    assert seen == [], "a forged event reached the bus"
    assert calls == [], "sysmon reached demo's action"
    violations = " ".join(errors)
    assert 'publish to "tuxpilot.evt.test-host.disk.low"' in violations
    assert 'publish to "tuxpilot.exec.test-host.demo.echo"' in violations
    assert 'publish to "tuxpilot.act.test-host.demo.echo"' in violations
    assert 'subscription to "tuxpilot.>"' in violations
    for nc in (operator, demo, sysmon):
        await nc.close()


async def test_a_plugin_hands_proposals_over_only_as_itself(secured: Secured) -> None:
    """The handover subject, like the stored one, carries the proposer in its last token: sysmon asking
    the gate on demo's gets a permissions violation and no answer, on its own the gate answers."""
    agent = await secured.connect("agent")
    handed: list[str] = []

    async def gate(msg: Any) -> None:
        handed.append(msg.subject)
        await msg.respond(b'{"decided": 0}')

    await agent.subscribe("tuxpilot.propose.test-host.*", queue="gate", cb=gate)
    await agent.flush()
    errors: list[str] = []
    sysmon = await secured.connect("sysmon", errors)
    with pytest.raises((NatsTimeout, NoRespondersError)):
        await sysmon.request("tuxpilot.propose.test-host.demo", proposal("echo"), timeout=1)
    assert json.loads((await sysmon.request("tuxpilot.propose.test-host.sysmon", b"{}", timeout=2)).data) == {
        "decided": 0}
    await asyncio.sleep(0.2)
    assert handed == ["tuxpilot.propose.test-host.sysmon"]
    assert 'publish to "tuxpilot.propose.test-host.demo"' in " ".join(errors)
    for nc in (agent, sysmon):
        await nc.close()


async def test_only_the_agent_reaches_a_plugins_execution_endpoint(secured: Secured) -> None:
    """The private `exec` subject: the operator and other plugins get a permissions violation, the agent a reply."""
    demo = await secured.connect("demo")
    calls: list[str] = []

    async def endpoint(msg: Any) -> None:
        calls.append(msg.subject)
        await msg.respond(b'{"status":"ok","data":"pong"}')

    await demo.subscribe("tuxpilot.exec.test-host.demo.echo", queue="demo", cb=endpoint)
    await demo.flush()
    for role in ("operator", "sysmon"):
        errors: list[str] = []
        intruder = await secured.connect(role, errors)
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await intruder.request("tuxpilot.exec.test-host.demo.echo", b"{}", timeout=1)
        await asyncio.sleep(0.2)
        assert any('publish to "tuxpilot.exec.test-host.demo.echo"' in e for e in errors), (role, errors)
        await intruder.close()
    assert calls == []
    agent = await secured.connect("agent")
    reply = await agent.request("tuxpilot.exec.test-host.demo.echo", b"{}", timeout=2)
    assert json.loads(reply.data)["data"] == "pong"

    errors = []
    plugin = await secured.connect("demo", errors)
    with pytest.raises((NatsTimeout, NoRespondersError)):
        await plugin.request("tuxpilot.act.web-2.sysmon.top_processes", b"{}", timeout=1)
    await asyncio.sleep(0.2)
    assert any('publish to "tuxpilot.act.web-2.sysmon.top_processes"' in e for e in errors)
    for nc in (demo, agent, plugin):
        await nc.close()


async def test_a_plugin_runs_on_its_own_credentials_through_the_pipeline(secured: Secured, tmp_path: Path) -> None:
    """The SDK and the agent work within the generated permissions: events in, actions out."""
    config = load_config(
        environ={
            "TUXPILOT_NATS_URL": secured.server.url,
            "TUXPILOT_HOST_ID": HOST,
            "TUXPILOT_STATE_DIR": str(tmp_path / "agent-state"),
            "TUXPILOT_GATE_COOLDOWN_S": "0",
        }
    )
    agent_cfg = config.nats.model_copy(update={"user_file": secured.user_file("agent")})
    agent_nc = await bus.connect(agent_cfg, secured.server.url, name="agent")
    js = agent_nc.jetstream()
    subjects = Subjects.of(config)
    await ensure_streams(js, subjects, config.streams)
    from tuxpilot.bus.registry import open_bucket

    await open_bucket(js, subjects)
    sysmon_manifest = load_manifest(builtin_dir() / "sysmon")
    await create_plugin_consumer(js, sysmon_manifest, subjects, config.streams)
    registry = Registry(agent_nc, subjects, {"sysmon": sysmon_manifest})
    await registry.start()
    gate = Gate(agent_nc, config, registry)
    await gate.start()

    from tuxpilot.sdk.plugin import load_plugin

    plugin = load_plugin(builtin_dir() / "sysmon")
    plugin_nc = await bus.connect(
        NatsConfig(user_file=secured.user_file("sysmon")), secured.server.url, name="sysmon"
    )
    operator = await secured.connect("operator")
    results = await operator.subscribe("tuxpilot.result.test-host.sysmon.top_processes")
    try:
        await plugin.start(plugin_nc, config)
        await bus.publish_event(agent_nc, subjects, Event.new("memory.high", HOST, value=97.0))
        result = json.loads((await results.next_msg(timeout=15)).data)
        assert result["status"] == "ok", result
        assert result["data"]["processes"]
    finally:
        await plugin.stop()
        await gate.stop()
        await registry.stop()
        for nc in (agent_nc, plugin_nc, operator):
            await nc.close()


@pytest.fixture
async def rig_with_file(nc: Client, config: Config, tmp_path: Path) -> AsyncIterator[tuple[Gate, Path]]:
    """A gate whose config comes from a file that `tuxpilot plugin grant` edits."""
    config.gate.cooldown_s = 0
    plugin, _ = demo_plugin()
    await plugin.start(nc, config)
    registry = Registry(nc, Subjects.of(config), {"demo": plugin.manifest})
    await registry.start()
    gate = Gate(nc, config, registry)
    await gate.start()
    yield gate, tmp_path / "host.toml"
    await gate.stop()
    await registry.stop()
    await plugin.stop()


async def test_ungranted_permission_is_refused_until_plugin_grant(
    rig_with_file: tuple[Gate, Path], tmp_path: Path
) -> None:
    gate, conf = rig_with_file
    conf.write_text("# the operator's notes stay\n[gate]\ncooldown_s = 0\n")
    refused = (await gate.handle(proposal("reboot")))[0]
    assert refused.status == "refused"
    assert "system_access" in (refused.message or "")
    assert "run `tuxpilot plugin grant demo system_access`" in (refused.message or "")  # says how

    plugins = tmp_path / "plugins" / "demo"
    plugins.mkdir(parents=True)
    (plugins / "plugin.toml").write_text(_toml(DEMO))
    env = {**os.environ, "TUXPILOT_PLUGIN_DIRS": json.dumps([str(tmp_path / "plugins")])}
    granted = await cli(env, "--config", str(conf), "plugin", "grant", "demo", "system_access")
    assert granted.returncode == 0, granted.stderr
    assert "# the operator's notes stay" in conf.read_text()

    # What the agent does when the file changes: take grants and policy from it again.
    fresh = load_config(conf, environ={})
    gate.config.plugins = fresh.plugins
    assert (await gate.handle(proposal("reboot")))[0].status == "ok"

    not_asked = await cli(env, "--config", str(conf), "plugin", "grant", "demo", "user_management")
    assert not_asked.returncode == 2
    assert "does not ask for user_management" in not_asked.stderr

    revoked = await cli(env, "--config", str(conf), "plugin", "revoke", "demo", "system_access")
    assert revoked.returncode == 0, revoked.stderr
    gate.config.plugins = load_config(conf, environ={}).plugins
    assert (await gate.handle(proposal("reboot")))[0].status == "refused"


def test_auth_show_lists_each_users_subjects(tmp_path: Path) -> None:
    env = {**os.environ, "TUXPILOT_HOST_ID": "web-1", "TUXPILOT_STATE_DIR": str(tmp_path)}
    done = subprocess.run([tuxpilot_exe(), "auth", "show", "--json"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    users = {u["role"] + ":" + u["user"]: u for u in json.loads(done.stdout)}
    sysmon = users["plugin:tuxpilot-web-1-plugin-sysmon"]
    assert "tuxpilot.proposal.web-1.sysmon" in sysmon["publish"]
    assert "tuxpilot.exec.web-1.sysmon.>" in sysmon["subscribe"]
    assert not any(s.startswith("$KV.") for s in sysmon["publish"])  # the registry is the agent's to write
    assert not any(s.startswith("tuxpilot.evt.web-1.") for s in sysmon["publish"])  # emits nothing
    exported = subprocess.run(
        [tuxpilot_exe(), "auth", "export", "-o", str(tmp_path / "auth.conf")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    assert "authorization" in (tmp_path / "auth.conf").read_text()


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [tuxpilot_exe(), *args], capture_output=True, text=True, env=env, timeout=60
    )


def _toml(doc: dict[str, Any]) -> str:
    import tomlkit

    return tomlkit.dumps(doc)


def test_approval_requests_only_for_a_plugin_that_reads_them() -> None:
    subjects = Subjects(prefix="tuxpilot", host="h")
    quiet = auth.plugin_user(subjects, Manifest.from_doc(DEMO))
    listening = auth.plugin_user(subjects, Manifest.from_doc({**DEMO, "reads": ["approvals"]}))
    assert "tuxpilot.approval.h.*" not in quiet.subscribe
    assert "tuxpilot.approval.h.*" in listening.subscribe
    for user in (quiet, listening):  # no plugin answers an approval
        assert not any(p.startswith("tuxpilot.approve") for p in user.publish)
    operator = auth.operator_user(subjects)
    assert "tuxpilot.approve.>" in operator.publish and "tuxpilot.approval.>" in operator.subscribe
