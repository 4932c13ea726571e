"""The fleet in NATS operator mode, against a real nats-server: enrolled hosts are kept to their own
subjects by the server, a host enrolled while the server runs connects, a revoked host is cut off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import load_config
from tuxpilot.bus import jwt
from tuxpilot.bus.server import NatsServer
from tuxpilot.fleet import admin, member

from tests.conftest import tuxpilot_exe, until


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    admin.init(tmp_path / "fleet", urls=["nats://127.0.0.1:4222"])
    return tmp_path / "fleet"


@pytest.fixture
def fleet_server(tmp_path: Path, fleet_dir: Path) -> Iterator[NatsServer]:
    fleet = admin.load(fleet_dir)
    server = NatsServer(tmp_path / "srv", extra_config=admin.operator_block(fleet, tmp_path / "srv" / "jwt")).start()
    yield server
    server.stop()


async def connect_creds(server: NatsServer, path: Path, inbox: str = "_INBOX", **kw: object) -> Client:
    return await nats.connect(server.url, user_credentials=str(path), inbox_prefix=inbox,
                              allow_reconnect=False, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def sys_nc(fleet_server: NatsServer, fleet_dir: Path) -> AsyncIterator[Client]:
    client = await connect_creds(fleet_server, fleet_dir / "sys.creds")
    yield client
    await client.close()


def creds_file(tmp_path: Path, fleet_dir: Path, host: str, role: str, plugin: str | None = None) -> Path:
    enrollment = member.load_enrollment(fleet_dir / "hosts" / f"{host}.json")
    return member.write_creds(tmp_path / f"state-{host}", enrollment, role, plugin)


def test_jwt_round_trip() -> None:
    account, operator = jwt.Key.new("account"), jwt.Key.new("operator")
    claims = jwt.decode(jwt.account_jwt(account, operator, "fleet", jetstream=True))
    assert claims["iss"] == operator.public
    assert claims["sub"] == account.public
    assert claims["nats"]["type"] == "account"
    token = jwt.account_jwt(account, operator, "fleet", jetstream=True)
    head, body, sig = token.split(".")
    with pytest.raises(ValueError, match="not a valid NATS JWT"):
        jwt.decode(f"{head}.{body}.{sig[:-4]}AAAA")


async def test_enrolled_while_running_kept_to_its_own_subjects(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, sys_nc: Client
) -> None:
    # Enrolled after the server started: the account update is pushed, nothing restarts.
    for host in ("web-1", "web-2"):
        fleet, _ = admin.enroll(fleet_dir, host, {"role": "web"})
        await admin.push(sys_nc, fleet)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    agent1 = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-1", "agent"),
                                 "_INBOX_tuxpilot-web-1-agent", error_cb=on_error)
    agent2 = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-2", "agent"),
                                 "_INBOX_tuxpilot-web-2-agent")
    watcher = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    try:
        seen: list[str] = []

        async def record(msg: Msg) -> None:
            seen.append(msg.subject)

        await watcher.subscribe("tuxpilot.>", cb=record)
        await watcher.flush()
        # web-1's agent publishes on web-2's subjects: the server refuses each one.
        for subject in ("tuxpilot.evt.web-2.memory.high", "tuxpilot.act.web-2.sysmon.report",
                        "tuxpilot.proposal.web-2", "tuxpilot.exec.web-2.sysmon.report"):
            await agent1.publish(subject, b"{}")
        await agent1.flush()
        await until(lambda: sum("permissions violation" in str(e).lower() for e in errors) >= 4, 5, "4 refusals")
        # Its own subjects pass.
        await agent1.publish("tuxpilot.evt.web-1.memory.high", b"{}")
        await agent1.flush()
        await until(lambda: "tuxpilot.evt.web-1.memory.high" in seen, 5, "web-1's own event")
        assert not [s for s in seen if ".web-2" in s]
    finally:
        await watcher.close()
        await agent1.close()
        await agent2.close()


async def test_plugin_kept_to_its_own_endpoint(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, sys_nc: Client
) -> None:
    fleet, _ = admin.enroll(fleet_dir, "web-1", {})
    await admin.push(sys_nc, fleet)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    # A plugin minted by its host's agent may serve its own exec endpoint, not another plugin's.
    evil = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-1", "plugin", "evil"),
                               "_INBOX_tuxpilot-web-1-plugin-evil", error_cb=on_error)
    agent = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-1", "agent"),
                                "_INBOX_tuxpilot-web-1-agent")
    try:
        async def answer(msg: Msg) -> None:
            await msg.respond(b'{"ok":1}')

        await evil.subscribe("tuxpilot.exec.web-1.sysmon.>", cb=answer)
        await evil.subscribe("tuxpilot.exec.web-1.evil.ping", cb=answer)
        await evil.flush()
        await until(lambda: any("permissions violation" in str(e).lower() for e in errors), 5, "refused subscription")
        reply = await agent.request("tuxpilot.exec.web-1.evil.ping", b"{}", timeout=2)
        assert reply.data == b'{"ok":1}'
        with pytest.raises(NoRespondersError):
            await agent.request("tuxpilot.exec.web-1.sysmon.report", b"{}", timeout=2)
        # Nor may it write another plugin's registry key or propose as another plugin.
        await evil.publish("tuxpilot.proposal.web-1.sysmon", b"{}")
        await evil.publish("tuxpilot.propose.web-1.sysmon", b"{}")  # nor hand one over as another
        await evil.flush()
        await until(lambda: any("tuxpilot.proposal.web-1.sysmon" in str(e) for e in errors), 5, "refused proposal")
        await until(lambda: any("tuxpilot.propose.web-1.sysmon" in str(e) for e in errors), 5, "refused handover")
        # Its own handover reaches its host's gate (the agent's user).
        handed: list[str] = []

        async def gate(msg: Msg) -> None:
            handed.append(msg.subject)

        await agent.subscribe("tuxpilot.propose.web-1.*", cb=gate)
        await agent.flush()
        await evil.publish("tuxpilot.propose.web-1.evil", b"{}")
        await evil.flush()
        await until(lambda: handed == ["tuxpilot.propose.web-1.evil"], 5, "evil's own handover")
        # No bucket key at all, its own included (a `Nats-Rollup: all` there would wipe the registry), and
        # not the public endpoint the gate serves.
        await evil.publish("$KV.tuxpilot_plugins.web-1.evil", b"{}", headers={"Nats-Rollup": "all"})
        await evil.subscribe("tuxpilot.act.web-1.evil.ping", cb=answer)
        await evil.flush()
        for refused in ('publish to "$kv.tuxpilot_plugins.web-1.evil"',
                        'subscription to "tuxpilot.act.web-1.evil.ping"'):
            await until(lambda text=refused: any(text in str(e).lower() for e in errors), 5, refused)
    finally:
        await evil.close()
        await agent.close()


async def test_revoked_host_cut_off_with_open_connection(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, sys_nc: Client
) -> None:
    for host in ("web-1", "web-2"):
        fleet, _ = admin.enroll(fleet_dir, host, {})
    await admin.push(sys_nc, fleet)
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    victim = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-1", "agent"),
                                 "_INBOX_tuxpilot-web-1-agent", closed_cb=on_closed)
    other = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-2", "agent"),
                                "_INBOX_tuxpilot-web-2-agent")
    try:
        assert victim.is_connected
        await admin.push(sys_nc, admin.revoke(fleet_dir, "web-1"))
        await asyncio.wait_for(closed.wait(), 5)  # its open connection is dropped by the server
        assert other.is_connected  # the others stay
        await other.publish("tuxpilot.evt.web-2.memory.high", b"{}")
        await other.flush()
        # And it cannot come back with a user minted from its old keys.
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-1", "agent"),
                                "_INBOX_tuxpilot-web-1-agent", max_reconnect_attempts=0)
    finally:
        await victim.close()
        await other.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


async def test_join_an_agent_and_its_plugin_to_a_running_fleet(tmp_path: Path) -> None:
    """fleet init → nats-server → fleet enroll (pushed live) → fleet join writes the host config → the agent
    mints its own and sysmon's users from the enrolment; the fleet admin calls sysmon through the gate."""
    folder = tmp_path / "fleet"
    server = NatsServer(tmp_path / "srv", extra_config="").start()  # only to learn a free port
    port = server.port
    server.stop()
    done = run_cli("fleet", "init", "--dir", str(folder), "--port", str(port))
    assert done.returncode == 0, done.stderr
    fleet = admin.load(folder)
    server = NatsServer(tmp_path / "srv", port=port,
                        extra_config=admin.operator_block(fleet, tmp_path / "srv" / "jwt")).start()
    try:
        done = run_cli("fleet", "enroll", "web-1", "--dir", str(folder), "--label", "role=web")
        assert done.returncode == 0, done.stderr
        assert "account updated on the servers" in done.stdout
        host_cfg = tmp_path / "web-1.toml"
        state = tmp_path / "state-web-1"
        done = run_cli("fleet", "join", str(folder / "hosts" / "web-1.json"), "--write", str(host_cfg),
                       env={"TUXPILOT_STATE_DIR": str(state)})
        assert done.returncode == 0, done.stderr
        text = host_cfg.read_text()
        assert 'host_id = "web-1"' in text and "creds" in text and "role = \"web\"" in text
        config = load_config(host_cfg, environ={"TUXPILOT_MONITOR_ENABLED": "false"})
        async with Agent(config, embedded=False) as agent:
            assert agent.nc is not None and agent.nc.is_connected
            operator = await connect_creds(server, folder / "admin.creds")
            try:
                reply = None
                for _ in range(600):  # until sysmon has connected with its own minted user
                    try:
                        reply = await operator.request("tuxpilot.act.web-1.sysmon.top_processes", b"{}", timeout=10)
                        break
                    except NoRespondersError:
                        await asyncio.sleep(0.1)

                assert reply is not None
                assert not (reply.headers or {}).get("Nats-Service-Error-Code"), reply.data
                assert json.loads(reply.data)
            finally:
                await operator.close()
    finally:
        server.stop()


@pytest.fixture
async def fleet_of_three(tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer,
                         sys_nc: Client) -> AsyncIterator[dict[str, Agent]]:
    """Three agents as separate hosts (own host id, credential, state dir) on one server; `ghost` is
    enrolled but never runs."""
    labels = {"web-1": "web", "web-2": "web", "db-1": "db", "ghost": "db"}
    for host, role in labels.items():
        fleet, _ = admin.enroll(fleet_dir, host, {"role": role})
    await admin.push(sys_nc, fleet)
    agents: dict[str, Agent] = {}
    try:
        for host in ("web-1", "web-2", "db-1"):
            config = load_config(environ={
                "TUXPILOT_NATS_URL": fleet_server.url, "TUXPILOT_HOST_ID": host,
                "TUXPILOT_STATE_DIR": str(tmp_path / f"state-{host}"), "TUXPILOT_MONITOR_ENABLED": "false",
                "TUXPILOT_FLEET_ENROLLMENT": str(fleet_dir / "hosts" / f"{host}.json"),
                "TUXPILOT_FLEET_LABELS": json.dumps({"role": labels[host]}),
                "TUXPILOT_FLEET_HEARTBEAT_S": "0.5",
            })
            agents[host] = Agent(config, embedded=False)
            await agents[host].start()
        yield agents
    finally:
        for agent in agents.values():
            await agent.stop()


def fleet_cli(server: NatsServer, fleet_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("call", *args, "--fleet-dir", str(fleet_dir), "--timeout", "15",
                   env={"TUXPILOT_NATS_URL": server.url, "TUXPILOT_NATS_CREDS": str(fleet_dir / "admin.creds"),
                        "TUXPILOT_HOST_ID": "admin", "TUXPILOT_CONFIG": os.devnull})


async def wait_for_sysmon(server: NatsServer, fleet_dir: Path, hosts: list[str]) -> None:
    nc = await connect_creds(server, fleet_dir / "admin.creds")
    try:
        for host in hosts:
            for _ in range(200):
                try:
                    await nc.request(f"tuxpilot.act.{host}.sysmon.top_processes", b"{}", timeout=10)
                    break
                except NoRespondersError:
                    await asyncio.sleep(0.1)
    finally:
        await nc.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_fleet_wide_call_targets_hosts_and_labels_and_names_the_silent(
    fleet_dir: Path, fleet_server: NatsServer, fleet_of_three: dict[str, Agent]
) -> None:
    await wait_for_sysmon(fleet_server, fleet_dir, list(fleet_of_three))
    every = await asyncio.to_thread(fleet_cli, fleet_server, fleet_dir, "--all", "sysmon", "top_processes")
    assert every.returncode == 1, every.stdout + every.stderr  # ghost never answers
    for host in ("web-1", "web-2", "db-1"):
        assert host in every.stdout
    assert "3 of 4 targeted host(s) answered; no answer from: ghost" in every.stdout
    webs = await asyncio.to_thread(fleet_cli, fleet_server, fleet_dir, "--hosts", "web-*", "sysmon", "top_processes")
    assert webs.returncode == 0, webs.stdout + webs.stderr
    assert "2 of 2 targeted host(s) answered" in webs.stdout and "db-1" not in webs.stdout
    dbs = await asyncio.to_thread(fleet_cli, fleet_server, fleet_dir, "--label", "role=db", "sysmon",
                                  "top_processes", '{"limit": 3}')
    assert "1 of 2 targeted host(s) answered; no answer from: ghost" in dbs.stdout, dbs.stdout + dbs.stderr
    assert "web-1" not in dbs.stdout and "db-1" in dbs.stdout
    # Each host's gate checked and audited the call like any other: bad params refused, recorded per host.
    bad = await asyncio.to_thread(fleet_cli, fleet_server, fleet_dir, "--hosts", "web-1", "sysmon",
                                  "top_processes", '{"limit": "many"}')
    assert bad.returncode == 1 and "web-1" in bad.stdout and "ok" not in bad.stdout.split("web-1", 1)[1].split()[0]
    nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    try:
        js = nc.jetstream()
        for host in ("web-1", "web-2", "db-1"):
            record = json.loads((await js.get_last_msg("tuxpilot_audit",
                                                        f"tuxpilot.result.{host}.sysmon.top_processes")).data)
            assert record["source"] == "operator", record
        refused = json.loads((await js.get_last_msg("tuxpilot_audit",
                                                     "tuxpilot.result.web-1.sysmon.top_processes")).data)
        assert refused["status"] == "refused", refused
    finally:
        await nc.close()


async def test_a_host_operator_cannot_call_the_fleet(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, sys_nc: Client
) -> None:
    fleet, _ = admin.enroll(fleet_dir, "web-1", {})
    await admin.push(sys_nc, fleet)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    operator = await connect_creds(fleet_server, creds_file(tmp_path, fleet_dir, "web-1", "operator"),
                                   "_INBOX_tuxpilot-web-1-operator", error_cb=on_error)
    try:
        await operator.publish("tuxpilot.fleet.act.sysmon.top_processes", b"{}",
                               reply="_INBOX_tuxpilot-web-1-operator.x")
        await operator.flush()
        await until(lambda: any("tuxpilot.fleet.act" in str(e) for e in errors), 5, "refused fleet call")
    finally:
        await operator.close()


def fleet_status(fleet_dir: Path, server: NatsServer) -> dict[str, dict[str, object]]:
    done = run_cli("fleet", "status", "--dir", str(fleet_dir), "--json", "--server", server.url,
                   env={"TUXPILOT_CONFIG": os.devnull})
    assert done.returncode == 0, done.stderr
    return {h["host"]: h for h in json.loads(done.stdout)}


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_fleet_status_and_join_and_loss_events(
    fleet_dir: Path, fleet_server: NatsServer, fleet_of_three: dict[str, Agent]
) -> None:
    hosts = await asyncio.to_thread(fleet_status, fleet_dir, fleet_server)
    assert {h: s["state"] for h, s in hosts.items()} == {
        "web-1": "alive", "web-2": "alive", "db-1": "alive", "ghost": "never seen"}
    beat = hosts["db-1"]["beat"]
    assert isinstance(beat, dict) and beat["labels"] == {"role": "db"} and beat["version"]
    nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    try:
        js = nc.jetstream()
        for host in ("web-1", "web-2", "db-1"):  # each said it joined, on its own subject
            joined = json.loads((await js.get_last_msg("tuxpilot_events",
                                                        f"tuxpilot.evt.{host}.fleet.host_joined")).data)
            assert joined["type"] == "fleet.host_joined"
        lost: list[dict[str, object]] = []

        async def on_lost(msg: Msg) -> None:
            lost.append(json.loads(msg.data))

        await nc.subscribe("tuxpilot.evt.*.fleet.host_lost", cb=on_lost)
        await fleet_of_three.pop("db-1").stop()  # db-1 goes away (its key stays, growing old)
        await until(lambda: any(e["data"]["lost"] == "db-1" for e in lost), 15, "fleet.host_lost for db-1")  # type: ignore[index]
        await asyncio.sleep(1.5)
        # What plugins consume is what the events stream stored: the loss once, whichever hosts said it
        # (on a loaded machine two hosts may each take themselves for the speaker during one tick).
        ids = {e["id"] for e in lost if e["data"]["lost"] == "db-1"}  # type: ignore[index]
        assert len(ids) == 1, lost
        stored = await js.subscribe("tuxpilot.evt.*.fleet.host_lost", ordered_consumer=True)
        kept = []
        with contextlib.suppress(TimeoutError):
            while True:
                kept.append(json.loads((await stored.next_msg(timeout=1)).data))
        await stored.unsubscribe()
        assert [e["data"]["lost"] for e in kept] == ["db-1"], kept
        hosts = await asyncio.to_thread(fleet_status, fleet_dir, fleet_server)
        assert hosts["db-1"]["state"] == "lost" and hosts["web-1"]["state"] == "alive"
    finally:
        await nc.close()


def test_leaf_join_writes_a_valid_leaf_server_config(tmp_path: Path) -> None:
    """`fleet init --leaf-port` → `enroll --leaf` → `join --leaf`: the host's leaf server config passes
    `nats-server -t` and the host config points the agent at it; a host not enrolled as a leaf is refused."""
    from tuxpilot.bus.server import server_binary

    folder, state = tmp_path / "fleet", tmp_path / "state"
    for args in (("fleet", "init", "--dir", str(folder), "--port", "1", "--leaf-port", "7422"),
                 ("fleet", "enroll", "edge-1", "--dir", str(folder), "--leaf"),
                 ("fleet", "enroll", "web-1", "--dir", str(folder))):
        done = run_cli(*args)  # no server on port 1: the enrolments are in the configs for its next start
        assert done.returncode == 0, done.stderr[-2000:]
    host_cfg = tmp_path / "edge-1.toml"
    done = run_cli("fleet", "join", str(folder / "hosts" / "edge-1.json"), "--leaf", "--leaf-listen", "4299",
                   "--write", str(host_cfg), env={"TUXPILOT_STATE_DIR": str(state)})
    assert done.returncode == 0, done.stderr
    leaf_conf = state / "fleet" / "leaf.conf"
    text = leaf_conf.read_text()
    assert "domain: leaf-edge-1" in text and '"nats-leaf://127.0.0.1:7422"' in text and "resolver: MEMORY" in text
    assert (leaf_conf.stat().st_mode & 0o077) == 0
    checked = subprocess.run([server_binary(), "-t", "-c", str(leaf_conf)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert 'url = "nats://127.0.0.1:4299"' in host_cfg.read_text()
    hub_conf = (folder / "server.conf").read_text()
    assert "domain: hub" in hub_conf and 'leafnodes { listen: "127.0.0.1:7422" }' in hub_conf
    refused = run_cli("fleet", "join", str(folder / "hosts" / "web-1.json"), "--leaf", "--write",
                      str(tmp_path / "web-1.toml"), env={"TUXPILOT_STATE_DIR": str(tmp_path / "state-web")})
    assert refused.returncode != 0 and "not enrolled as a leaf host" in refused.stdout + refused.stderr
