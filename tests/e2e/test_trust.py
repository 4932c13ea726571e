"""The trust boundary, attacked for real: `tuxpilot up` (embedded nats-server with the generated users),
real plugin processes, and attackers holding a plugin's or the operator's own credentials.

Each test performs one attack a security review made against an earlier version, and checks that it
is refused by whoever should refuse it (nats-server, or the gate) and that the audit says who did it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import Manifest, builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, Proposal, ProposedAction

from tests.conftest import tuxpilot_exe, until
from tests.e2e.test_up import URL_LINE

pytestmark = pytest.mark.slow

HOST = "trust-host"
TEST_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
BENCH_PLUGINS = Path(__file__).resolve().parents[2] / "benchmarks"  # noop, the bench's plugin
RATE, RATE_WINDOW_S = 300, 4


class Up:
    """`tuxpilot up` with sysmon, noop and tmpclean; the rate limit short enough to see its summaries."""

    def __init__(self, base: Path):
        self.state = base / "state"
        self.tmp = base / "tmp"
        self.tmp.mkdir(parents=True)
        self.env = {
            **os.environ,
            "TUXPILOT_STATE_DIR": str(self.state),
            "TUXPILOT_HOST_ID": HOST,
            "TUXPILOT_MONITOR_ENABLED": "false",
            "TUXPILOT_RUN_PLUGINS": "sysmon,noop,tmpclean",
            "TUXPILOT_PLUGIN_DIRS": json.dumps([str(TEST_PLUGINS), str(BENCH_PLUGINS)]),
            "TUXPILOT_PLUGINS": json.dumps({"tmpclean": {"config": {"dir": str(self.tmp)}}}),
            "TUXPILOT_GATE_COOLDOWN_S": "0",
            "TUXPILOT_GATE_PROPOSAL_RATE": str(RATE),
            "TUXPILOT_GATE_PROPOSAL_RATE_WINDOW_S": str(RATE_WINDOW_S),
        }
        for key in ("TUXPILOT_NATS_URL", "TUXPILOT_CONFIG"):
            self.env.pop(key, None)
        self.log = (base / "up.log").open("w+")
        self.proc = subprocess.Popen([tuxpilot_exe(), "up"], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=self.env)
        self.url = self._read_url()
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = URL_LINE.search(line)
            if found:
                return found.group(1)
        self.proc.kill()
        raise AssertionError("tuxpilot up printed no URL")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def user(self, role: str) -> dict[str, Any]:
        name = f"tuxpilot-{HOST}-{role}"
        doc: dict[str, Any] = json.loads((self.state / "credentials" / f"{name}.json").read_text())
        return doc

    async def connect(self, role: str, errors: list[str] | None = None) -> Client:
        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        doc = self.user(role)
        return await nats.connect(self.url, user=doc["user"], password=doc["password"],
                                  inbox_prefix=doc["inbox_prefix"], error_cb=on_error, allow_reconnect=False)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=self.env, timeout=60)

    def everything_said(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return "".join(self.lines) + self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = Up(tmp_path_factory.mktemp("trust"))
    yield running
    running.stop()


class Audit:
    """Every record on this host's audit subjects, as the operator may read them."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def start(self, nc: Client) -> None:
        async def on_record(msg: Any) -> None:
            self.records.append(json.loads(msg.data))

        await nc.subscribe(f"tuxpilot.result.{HOST}.>", cb=on_record)
        await nc.flush()

    def where(self, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if all(r.get(k) == v for k, v in fields.items())]


@pytest.fixture
async def operator(up: Up) -> AsyncIterator[tuple[Client, Audit]]:
    nc = await up.connect("operator")
    audit = Audit()
    await audit.start(nc)
    await serving(nc, "sysmon", "noop", "tmpclean")
    yield nc, audit
    await nc.close()


async def serving(nc: Client, *plugins: str) -> None:
    """Until each plugin answers discovery (its process started and subscribed)."""
    for plugin in plugins:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                await nc.request(f"$SRV.PING.{plugin}", b"", timeout=0.5)
                break
            except (NatsTimeout, NoRespondersError):
                assert asyncio.get_running_loop().time() < deadline, f"{plugin} never started"
                await asyncio.sleep(0.2)


def proposal(body_plugin: str, owner: str, action: str, params: dict[str, Any]) -> bytes:
    event = Event.new("memory.high", HOST, value=97.0)
    return Proposal(
        event_id=event.id, plugin=body_plugin, event=event,
        actions=[ProposedAction(plugin=owner, action=action, params=params)],
    ).to_json()


async def stats(nc: Client, plugin: str) -> dict[str, int]:
    """Requests per endpoint, as the plugin's instances count them (`nats micro stats`)."""
    reply = await nc.request(f"$SRV.STATS.{plugin}", b"", timeout=2)
    return {e["name"]: e["num_requests"] for e in json.loads(reply.data)["endpoints"]}


async def violation(errors: list[str], subject: str) -> None:
    # nats-py lower-cases the server's error text
    want = f'publish to "{subject}"'.lower()
    await until(lambda: any(want in e.lower() for e in errors), 5, f"a violation on {subject}")


# -- 1. impersonation ----------------------------------------------------------------------------


async def test_a_plugin_cannot_get_another_plugins_actions_executed(up: Up, operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    before = await stats(nc, "noop")
    errors: list[str] = []
    sysmon = await up.connect("plugin-sysmon", errors)
    # On its own subject, a body naming noop: impersonation, audited with the real proposer.
    await sysmon.publish(f"tuxpilot.proposal.{HOST}.sysmon", proposal("noop", "noop", "echo", {"seq": 1}))
    # Naming itself but asking docker's action: a foreign action.
    wipe = {"container": "production-db", "force": True, "volumes": True}
    await sysmon.publish(f"tuxpilot.proposal.{HOST}.sysmon", proposal("sysmon", "docker", "remove_container", wipe))
    # Publishing on noop's proposal subject: nats-server refuses.
    await sysmon.publish(f"tuxpilot.proposal.{HOST}.noop", proposal("noop", "noop", "echo", {"seq": 2}))
    # Its own action, as itself: decided and run with its own grants.
    await sysmon.publish(f"tuxpilot.proposal.{HOST}.sysmon", proposal("sysmon", "sysmon", "top_processes", {"n": 1}))
    await sysmon.flush()
    await until(lambda: len(audit.where(proposed_by="sysmon")) >= 3, 15, "three records")
    await violation(errors, f"tuxpilot.proposal.{HOST}.noop")
    await asyncio.sleep(0.5)

    [echo] = audit.where(plugin="noop", action="echo")
    assert (echo["status"], echo["reason"], echo["proposed_by"]) == ("refused", "impersonation", "sysmon")
    [remove] = audit.where(plugin="docker", action="remove_container")
    assert (remove["status"], remove["reason"], remove["proposed_by"]) == ("refused", "foreign_action", "sysmon")
    [own] = audit.where(plugin="sysmon", action="top_processes", source="proposal")
    assert own["status"] == "ok" and own["proposed_by"] == "sysmon"
    assert await stats(nc, "noop") == before, "noop ran something"
    await sysmon.close()


# -- 2. the registry: local manifests decide; plugins write no bucket -----------------------------


async def test_a_plugin_can_neither_roll_up_nor_write_the_registry(up: Up, operator: tuple[Client, Audit]) -> None:
    nc, _ = operator
    kv = await nc.jetstream().key_value("tuxpilot_plugins")
    before = {key: (await kv.get(key)).value for key in (f"{HOST}.sysmon", f"{HOST}.noop", f"{HOST}.tmpclean")}
    errors: list[str] = []
    sysmon = await up.connect("plugin-sysmon", errors)
    own_key, other_key = f"$KV.tuxpilot_plugins.{HOST}.sysmon", f"$KV.tuxpilot_plugins.{HOST}.noop"
    await sysmon.publish(own_key, b"{}", headers={"Nats-Rollup": "all"})
    await sysmon.publish(other_key, b'{"manifest": {}}')
    await sysmon.publish("$JS.API.STREAM.PURGE.KV_tuxpilot_plugins", b"{}")
    await sysmon.flush()
    for subject in (own_key, other_key, "$JS.API.STREAM.PURGE.KV_tuxpilot_plugins"):
        await violation(errors, subject)
    after = {key: (await kv.get(key)).value for key in before}
    assert after == before, "a registry entry changed"
    assert all(json.loads(v or b"{}")["manifest"]["name"] for v in after.values())
    await sysmon.close()


async def test_a_poisoned_registry_entry_is_not_what_the_gate_decides_from(
    up: Up, operator: tuple[Client, Audit]
) -> None:
    """Whoever writes the bucket (here the agent's own credentials stand in for it), the gate decides from the
    manifest it loaded from disk: a params schema pointing at the agent's credential file reads nothing."""
    nc, audit = operator
    password = up.user("agent")["password"]
    agent = await up.connect("agent")
    kv = await agent.jetstream().key_value("tuxpilot_plugins")
    entry = json.loads((await kv.get(f"{HOST}.sysmon")).value or b"{}")
    secret = up.state / "credentials" / f"tuxpilot-{HOST}-agent.json"
    entry["manifest"]["actions"]["top_processes"]["params"] = {"$ref": f"file://{secret}#/password"}
    await kv.put(f"{HOST}.sysmon", json.dumps(entry).encode())

    sysmon = await up.connect("plugin-sysmon")
    await sysmon.publish(f"tuxpilot.proposal.{HOST}.sysmon", proposal("sysmon", "sysmon", "top_processes", {"n": 2}))
    await sysmon.flush()
    await until(lambda: bool(audit.where(plugin="sysmon", params={"n": 2})), 15, "the proposal's record")
    [record] = audit.where(plugin="sysmon", params={"n": 2})
    assert record["status"] == "ok"
    called = await nc.request(f"tuxpilot.act.{HOST}.sysmon.top_processes", b'{"n": 1}', timeout=15)
    assert json.loads(called.data)["status"] == "ok"
    assert password not in json.dumps(audit.records)
    assert password not in up.everything_said()
    for client in (agent, sysmon):
        await client.close()


def test_a_manifest_whose_schema_reaches_outside_the_document_is_refused_at_load(tmp_path: Path) -> None:
    """`$ref` to a file: refused, nothing read; to a listener that never answers: refused, never connected."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"password": "hunter2-the-secret"}))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    base = load_manifest(builtin_dir() / "sysmon").to_doc()
    try:
        for ref in (f"file://{secret}#/password", f"http://127.0.0.1:{port}/schema.json",
                    f"http://127.0.0.1:{port}/"):
            doc = json.loads(json.dumps(base))
            doc["actions"]["top_processes"]["params"] = {
                "type": "object", "properties": {"n": {"$ref": ref}},
            }
            with pytest.raises(ConfigError) as refused:
                Manifest.from_doc(doc, source="plugin.toml")
            assert "leaves the document" in refused.value.message
            assert "hunter2" not in json.dumps(refused.value.to_doc())
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected to it
    finally:
        listener.close()


# -- 3. only the gate reaches a plugin; every call goes through it ------------------------------


async def test_only_the_agent_may_publish_to_a_plugins_execution_endpoint(
    up: Up, operator: tuple[Client, Audit]
) -> None:
    nc, _ = operator
    before = await stats(nc, "tmpclean")
    subject = f"tuxpilot.exec.{HOST}.tmpclean.cleanup_tmp"
    for role in ("operator", "plugin-sysmon", "plugin-noop"):
        errors: list[str] = []
        intruder = await up.connect(role, errors)
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await intruder.request(subject, b'{"older_than_s": 0}', timeout=1)
        await violation(errors, subject)
        await intruder.close()
    assert await stats(nc, "tmpclean") == before


async def test_the_direct_call_bypass_is_refused_and_audited(up: Up, operator: tuple[Client, Audit]) -> None:
    """tmpclean was not granted filesystem_write: `tuxpilot call` goes through the gate, which refuses it."""
    _, audit = operator
    for name in ("a.log", "b.log"):
        (up.tmp / name).write_text("old\n")
    done = await asyncio.to_thread(up.cli, "call", HOST, "tmpclean", "cleanup_tmp", '{"older_than_s":0}')
    print(f"$ tuxpilot call {HOST} tmpclean cleanup_tmp '{{\"older_than_s\":0}}'\n{done.stdout}{done.stderr}"
          f"exit {done.returncode}")
    assert done.returncode == 1, done.stderr
    reply = json.loads(done.stdout)
    assert reply["code"] == "permission_not_granted"
    assert "tuxpilot plugin grant tmpclean filesystem_write" in reply["message"]
    assert sorted(p.name for p in up.tmp.iterdir()) == ["a.log", "b.log"], "the files are gone"
    await until(lambda: bool(audit.where(plugin="tmpclean", action="cleanup_tmp", source="operator")), 10, "record")
    [record] = audit.where(plugin="tmpclean", action="cleanup_tmp", source="operator")
    assert (record["status"], record["reason"]) == ("refused", "permission_not_granted")
    assert record["caller"] == f"tuxpilot-{HOST}-operator"
    listed = await asyncio.to_thread(up.cli, "audit", "--plugin", "tmpclean", "--json")
    assert any(r.get("source") == "operator" and r.get("status") == "refused" for r in json.loads(listed.stdout))


async def test_an_operator_call_is_checked_executed_and_audited(up: Up, operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    reply = await nc.request(f"tuxpilot.act.{HOST}.sysmon.top_processes", b'{"n": 2}', timeout=15)
    assert reply.headers is None or "Nats-Service-Error-Code" not in reply.headers
    assert json.loads(reply.data)["status"] == "ok"
    bad = await nc.request(f"tuxpilot.act.{HOST}.sysmon.top_processes", b'{"n": "five"}', timeout=15)
    assert bad.headers is not None and bad.headers["Nats-Service-Error-Code"] == "400"
    assert json.loads(bad.data)["code"] == "invalid_params"
    garbage = await nc.request(f"tuxpilot.act.{HOST}.sysmon.top_processes", b"{nope", timeout=15)
    assert json.loads(garbage.data)["code"] == "bad_request"
    await until(lambda: len(audit.where(plugin="sysmon", source="operator")) >= 3, 10, "three records")
    statuses = sorted((r["status"], r.get("reason")) for r in audit.where(plugin="sysmon", source="operator"))
    assert ("ok", None) in statuses and ("refused", "invalid_params") in statuses
    assert ("refused", "bad_request") in statuses
    assert {r["caller"] for r in audit.where(source="operator")} == {f"tuxpilot-{HOST}-operator"}


async def test_the_gate_is_a_micro_service_whose_endpoints_carry_each_actions_contract(
    up: Up, operator: tuple[Client, Audit]
) -> None:
    nc, _ = operator
    info = json.loads((await nc.request("$SRV.INFO.tuxpilot-gate", b"", timeout=2)).data)
    assert info["metadata"] == {"tuxpilot": "gate", "host": HOST}
    endpoints = {e["subject"]: e for e in info["endpoints"]}
    top = endpoints[f"tuxpilot.act.{HOST}.sysmon.top_processes"]
    assert top["queue_group"] == f"tuxpilot-gate-{HOST}"
    meta = top["metadata"]
    assert meta["permission"] == "filesystem_read" and meta["timeout_s"] == "15"
    assert json.loads(meta["params"])["properties"]["n"]["type"] == "integer"
    # Discovery of the plugins still works, each on its private subjects.
    sysmon = json.loads((await nc.request("$SRV.INFO.sysmon", b"", timeout=2)).data)
    assert {e["subject"] for e in sysmon["endpoints"]} >= {f"tuxpilot.exec.{HOST}.sysmon.top_processes"}
    assert sysmon["metadata"]["plugin"] == "sysmon" and sysmon["metadata"]["tuxpilot"] == "plugin"


# -- 7. late outcomes ------------------------------------------------------------------------------


async def test_a_plugin_stopped_past_the_timeout_has_its_late_reply_recorded(
    up: Up, operator: tuple[Client, Audit]
) -> None:
    nc, audit = operator
    [tmpclean] = [p for p in psutil.Process(up.proc.pid).children(recursive=True)
                  if "tmpclean" in " ".join(p.cmdline())]
    tmpclean.send_signal(signal.SIGSTOP)
    try:
        reply = await nc.request(f"tuxpilot.act.{HOST}.tmpclean.stamp", b'{"text": "late-1"}', timeout=15)
        assert json.loads(reply.data)["code"] == "timeout"  # stamp's timeout is 1 s
        await until(lambda: bool(audit.where(plugin="tmpclean", action="stamp", status="timeout")), 5, "timeout")
    finally:
        tmpclean.send_signal(signal.SIGCONT)
    [timeout] = audit.where(plugin="tmpclean", action="stamp", status="timeout")
    await until(lambda: len(audit.where(id=timeout["id"])) == 2, 15, "the late reply's record")
    late = next(r for r in audit.where(id=timeout["id"]) if r is not timeout)
    assert (late["status"], late["late"]) == ("ok", True)
    assert late["data"] == {"stamped": "late-1"} and late["caller"] == timeout["caller"]
    assert (up.tmp / "stamps").read_text().split() == ["late-1"]  # it did run, once


# -- 3. a flood of large proposals: bounded records, other plugins still decided ------------------


async def test_a_flood_of_large_proposals_is_summarised_and_others_are_still_decided(
    up: Up, operator: tuple[Client, Audit]
) -> None:
    nc, audit = operator
    js = nc.jetstream()
    audit_before = (await js.stream_info("tuxpilot_audit")).state.bytes
    sysmon = await up.connect("plugin-sysmon")
    noop = await up.connect("plugin-noop")
    big = {"n": 1, "junk": "x" * (40 * 1024)}  # invalid: top_processes takes no `junk`
    flood = 2000
    for i in range(flood):
        event = Event.new("memory.high", HOST)
        body = Proposal(event_id=event.id, plugin="sysmon", event=event,
                        actions=[ProposedAction(plugin="sysmon", action="top_processes", params=big)]).to_json()
        await sysmon.publish(f"tuxpilot.proposal.{HOST}.sysmon", body)
        if i == flood // 2:
            await noop.publish(f"tuxpilot.proposal.{HOST}.noop", proposal("noop", "noop", "echo", {"seq": 7}))
    await sysmon.flush()
    await noop.flush()
    await until(lambda: bool(audit.where(plugin="noop", action="echo", status="ok")), 60, "noop's proposal decided")

    def flooded() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        # By id: a record published again after a slow ack is stored once but seen twice by a subscriber.
        refused = {r["id"]: r for r in audit.where(plugin="sysmon", reason="invalid_params") if r.get("params_sha256")}
        summaries = {r["id"]: r for r in audit.where(plugin="sysmon", reason="rate_limited")}
        return list(refused.values()), list(summaries.values())

    def accounted() -> int:
        refused, summaries = flooded()
        return len(refused) + sum(s["data"]["dropped"] for s in summaries)

    # Every proposal of the flood is either decided or counted in a window's summary.
    await until(lambda: accounted() >= flood, 120, "every flooded proposal decided or summarised")
    await asyncio.sleep(1.5)  # nothing more shows up
    refused, summaries = flooded()
    decided = len(refused)
    dropped = sum(s["data"]["dropped"] for s in summaries)
    print(f"flood={flood} decided={decided} dropped={dropped} summaries={len(summaries)}")
    assert decided + dropped == flood
    assert 1 <= len(summaries) <= flood // RATE + 2  # one per window, not one per proposal
    assert all("params" not in r and r["params_bytes"] > 40 * 1024 and len(r["params_sha256"]) == 64 for r in refused)
    grown = (await js.stream_info("tuxpilot_audit")).state.bytes - audit_before
    assert grown < decided * 8 * 1024, f"the audit grew by {grown} bytes for {decided} refusals"
    for client in (sysmon, noop):
        await client.close()


