"""Rules, schedules and approvals through a real `tuxpilot up`: its embedded nats-server with the
generated users, the noop plugin as a real process, and the operator's own credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from tuxpilot.protocol.models import Event

from tests.conftest import tuxpilot_exe, until
from tests.e2e.test_trust import BENCH_PLUGINS, Audit, Up, serving

pytestmark = pytest.mark.slow

HOST = "trust-host"  # Up's credentials are named after it
CONFIG = """
labels = { role = "web" }

[[rules]]
name = "echo-hot"
events = ["bench.hot"]
condition = 'event.value > 90.0 && labels.role == "web"'
[[rules.actions]]
plugin = "noop"
action = "echo"
params = { seq = "{{ event.data.seq }}", value = "{{ event.value }}" }

[[rules]]
name = "broken"
events = ["bench.hot"]
condition = 'event.value > '
[[rules.actions]]
plugin = "noop"
action = "echo"
params = { seq = 0 }

[[rules]]
name = "once"
events = ["bench.once"]
once_within = 3600
[[rules.actions]]
plugin = "noop"
action = "echo"
params = { seq = "{{ event.data.seq }}" }

[[rules]]
name = "held"
events = ["bench.held"]
[[rules.actions]]
plugin = "noop"
action = "echo"
params = { seq = "{{ event.data.seq }}" }

[[schedules]]
name = "nightly-echo"
cron = "0 3 * * *"
timezone = "Europe/Paris"
[[schedules.actions]]
plugin = "noop"
action = "echo"
params = { seq = 7 }

[[rules]]
name = "brief"
events = ["bench.brief"]
[[rules.actions]]
plugin = "noop"
action = "echo"
params = { seq = "{{ event.data.seq }}" }

[approvals]
rules = ["held", "brief"]
timeout_s = 600
timeouts = { brief = 2 }
"""


class AutomatedUp(Up):
    """`tuxpilot up` with a host config holding rules, a schedule and an approval policy."""

    def __init__(self, base: Path):
        config = base / "tuxpilot.toml"
        config.write_text(CONFIG)
        env = {
            **os.environ,
            "TUXPILOT_CONFIG": str(config),
            "TUXPILOT_STATE_DIR": str(base / "state"),
            "TUXPILOT_HOST_ID": HOST,
            "TUXPILOT_MONITOR_ENABLED": "false",
            "TUXPILOT_RUN_PLUGINS": "noop",
            "TUXPILOT_PLUGIN_DIRS": json.dumps([str(BENCH_PLUGINS)]),
            "TUXPILOT_GATE_COOLDOWN_S": "0",
        }
        env.pop("TUXPILOT_NATS_URL", None)
        self.state, self.env = base / "state", env
        self.log = (base / "up.log").open("a+")
        self.proc = subprocess.Popen([tuxpilot_exe(), "up"], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        self.url = self._read_url()
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("automation")


@pytest.fixture(scope="module")
def up(base: Path) -> Iterator[AutomatedUp]:
    running = AutomatedUp(base)
    yield running
    running.stop()


@pytest.fixture
async def operator(up: AutomatedUp) -> AsyncIterator[tuple[Client, Audit]]:
    nc = await up.connect("operator")
    audit = Audit()
    await audit.start(nc)
    await serving(nc, "noop")
    yield nc, audit
    await nc.close()


async def emit(nc: Client, kind: str, value: float, seq: int) -> Event:
    event = Event.new(f"bench.{kind}", HOST, value=value, data={"seq": seq})
    await nc.publish(f"tuxpilot.evt.{HOST}.bench.{kind}", event.to_json())
    return event


async def control(nc: Client, verb: str, body: dict[str, Any]) -> Any:
    reply = await nc.request(f"tuxpilot.agent.{HOST}.{verb}", json.dumps(body).encode(), timeout=15)
    return json.loads(reply.data)


async def answer(nc: Client, approval_id: str, decision: str) -> Any:
    reply = await nc.request(f"tuxpilot.approve.{HOST}.{approval_id}",
                             json.dumps({"decision": decision, "comment": "from the test"}).encode(), timeout=15)
    return json.loads(reply.data), (reply.headers or {}).get("Nats-Service-Error-Code")


async def test_a_rule_matches_proposes_templated_params_and_is_audited(operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    event = await emit(nc, "hot", 97.5, 41)
    await until(lambda: audit.where(event_id=event.id), 20, "the rule's record")
    [record] = audit.where(event_id=event.id)
    assert record["status"] == "ok" and record["source"] == "rule" and record["proposed_by"] == "echo-hot"
    assert record["params"] == {"seq": 41, "value": 97.5}  # numbers stay numbers
    cool = await emit(nc, "hot", 12.0, 42)
    explained = await until_explained(nc, cool.id)
    echo = next(v for v in explained["verdicts"] if v["rule"] == "echo-hot")
    assert not echo["matched"] and "condition is False" in echo["why"]
    assert audit.where(event_id=cool.id) == []


async def until_explained(nc: Client, event_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    async def seen() -> bool:
        found[:] = [e for e in (await control(nc, "rules", {"op": "explain", "last": 50}))["events"]
                    if e["event"]["id"] == event_id]
        return bool(found)

    for _ in range(100):
        if await seen():
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"event {event_id} never explained")


async def test_a_broken_rule_is_refused_with_its_position_and_the_others_work(
    operator: tuple[Client, Audit],
) -> None:
    nc, _ = operator
    listing = await control(nc, "rules", {"op": "list"})
    assert {r["name"] for r in listing["rules"]} == {"echo-hot", "once", "held", "brief"}
    assert "line 1, column 15" in listing["refused"]["broken"]
    tested = await control(nc, "rules", {"op": "test", "rule": "echo-hot",
                                         "event": {"type": "bench.hot", "value": 99.0, "data": {"seq": 3}}})
    assert tested["matched"] and tested["actions"] == [{"plugin": "noop", "action": "echo",
                                                        "params": {"seq": 3, "value": 99.0}}]


async def test_once_within_throttles_the_second_firing(operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    first = await emit(nc, "once", 1.0, 100)
    await until(lambda: audit.where(event_id=first.id), 20, "the first firing")
    second = await emit(nc, "once", 1.0, 101)
    explained = await until_explained(nc, second.id)
    once = next(v for v in explained["verdicts"] if v["rule"] == "once")
    assert "throttled" in once["why"] and "once_within" in once["why"]
    assert audit.where(event_id=second.id) == []


async def held(nc: Client, audit: Audit, seq: int, rule: str = "held") -> str:
    event = await emit(nc, rule, 1.0, seq)
    await until(lambda: audit.where(event_id=event.id, status="pending"), 20, "the pending record")
    [record] = audit.where(event_id=event.id, status="pending")
    assert record["reason"] == "approval_required"
    return str(record["id"])


async def test_approved_runs_once_even_when_two_approvers_answer_at_once(
    up: AutomatedUp, operator: tuple[Client, Audit],
) -> None:
    nc, audit = operator
    requests: list[dict[str, Any]] = []

    async def on_request(msg: Any) -> None:
        requests.append(json.loads(msg.data))

    await nc.subscribe(f"tuxpilot.approval.{HOST}.*", cb=on_request)
    approval_id = await held(nc, audit, 200)
    await until(lambda: requests, 10, "the approval request")
    assert requests[0]["id"] == approval_id and requests[0]["proposer"] == "held"
    assert requests[0]["params"] == {"seq": 200}
    pending = await control(nc, "approvals", {})
    assert [a["id"] for a in pending["approvals"]] == [approval_id]
    other = await up.connect("operator")  # a second approver, racing the first
    try:
        both = await asyncio.gather(answer(nc, approval_id, "approve"), answer(other, approval_id, "approve"))
    finally:
        await other.close()
    codes = sorted(code or "ok" for _, code in both)
    assert codes == ["409", "ok"], both
    await until(lambda: audit.where(id=approval_id, status="ok"), 20, "the approved run")
    [ran] = audit.where(id=approval_id, status="ok")
    assert ran["approved_by"] == f"tuxpilot-{HOST}-operator" and ran["source"] == "rule"
    assert (await control(nc, "approvals", {}))["approvals"] == []
    # The same event again (a redelivery): not held again, not run again
    again = Event.new("bench.held", HOST, value=1.0, data={"seq": 200}).model_copy(update={"id": ran["event_id"]})
    await nc.publish(f"tuxpilot.evt.{HOST}.bench.held", again.to_json())
    await until(lambda: audit.where(id=approval_id, status="duplicate"), 20, "the duplicate record")
    assert len(audit.where(id=approval_id, status="ok")) == 1


async def test_denied_is_audited_and_not_run(operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    approval_id = await held(nc, audit, 300)
    doc, code = await answer(nc, approval_id, "deny")
    assert code is None and doc["status"] == "refused" and doc["reason"] == "approval_denied"
    await until(lambda: audit.where(id=approval_id, reason="approval_denied"), 20, "the denial")
    assert audit.where(id=approval_id, status="ok") == []


async def test_an_unanswered_approval_expires_and_a_late_answer_is_refused(operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    approval_id = await held(nc, audit, 400, rule="brief")
    await until(lambda: audit.where(id=approval_id, reason="approval_expired"), 30, "the expiry record")
    doc, code = await answer(nc, approval_id, "approve")
    assert code == "409" and "expired" in doc["message"]
    assert audit.where(id=approval_id, status="ok") == []


async def test_a_plugin_may_not_answer_or_read_approvals(up: AutomatedUp, operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    approval_id = await held(nc, audit, 500)
    errors: list[str] = []
    plugin = await up.connect("plugin-noop", errors)
    try:
        await plugin.publish(f"tuxpilot.approve.{HOST}.{approval_id}", b'{"decision":"approve"}')
        await plugin.subscribe(f"tuxpilot.approval.{HOST}.*")
        await plugin.flush()
        await until(lambda: len(errors) >= 2, 10, "both permission violations")
    finally:
        await plugin.close()
    assert any("publish" in e.lower() for e in errors) and any("subscri" in e.lower() for e in errors)
    assert (await control(nc, "approvals", {}))["approvals"][0]["state"] == "pending"
    await answer(nc, approval_id, "deny")


async def test_a_schedule_runs_now_through_the_gate_and_lists_its_next_runs(operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    listing = await control(nc, "schedules", {})
    [nightly] = listing["schedules"]
    assert (nightly["name"] == "nightly-echo" and nightly["next_runs"][0].endswith("03:00:00+01:00")) or \
        nightly["next_runs"][0].endswith("03:00:00+02:00")
    ran = await control(nc, "schedules", {"op": "run", "name": "nightly-echo"})
    [result] = ran["results"]
    assert result["status"] == "ok" and result["source"] == "schedule" and result["proposed_by"] == "nightly-echo"
    await until(lambda: audit.where(id=result["id"], status="ok"), 20, "the schedule's record")


async def test_the_cli_lists_tests_explains_and_answers(up: AutomatedUp, operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    listed = await asyncio.to_thread(up.cli, "rules", "list")
    assert listed.returncode == 0 and "echo-hot" in listed.stdout and "REFUSED broken" in listed.stdout
    assert "column 15" in listed.stdout
    tested = await asyncio.to_thread(up.cli, "rules", "test", "echo-hot", "--event",
                                     '{"type": "bench.hot", "value": 50.0, "data": {"seq": 1}}')
    assert tested.returncode == 1 and '"matched": false' in tested.stdout
    explained = await asyncio.to_thread(up.cli, "rules", "explain", "--last", "3")
    assert explained.returncode == 0 and "echo-hot" in explained.stdout
    schedules = await asyncio.to_thread(up.cli, "schedule", "list")
    assert schedules.returncode == 0 and "nightly-echo" in schedules.stdout and "Europe/Paris" in schedules.stdout
    approval_id = await held(nc, audit, 700)
    pending = await asyncio.to_thread(up.cli, "approvals")
    assert pending.returncode == 0 and approval_id in pending.stdout
    approved = await asyncio.to_thread(up.cli, "approve", approval_id, "-m", "looks fine")
    assert approved.returncode == 0 and '"status": "ok"' in approved.stdout, approved.stderr
    again = await asyncio.to_thread(up.cli, "deny", approval_id)
    assert again.returncode == 1 and "already approved" in again.stderr
    missing = await asyncio.to_thread(up.cli, "schedule", "run", "nope")
    assert missing.returncode == 1 and "no schedule" in missing.stderr


async def test_rules_are_reloaded_live_when_the_config_changes(base: Path, operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    config = base / "tuxpilot.toml"
    config.write_text(CONFIG + """
[[rules]]
name = "added-live"
events = ["bench.live"]
[[rules.actions]]
plugin = "noop"
action = "echo"
params = { seq = "{{ event.data.seq }}" }
""")

    async def loaded() -> bool:
        names = {r["name"] for r in (await control(nc, "rules", {"op": "list"}))["rules"]}
        return "added-live" in names

    for _ in range(200):
        if await loaded():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the new rule was never loaded")
    event = await emit(nc, "live", 1.0, 800)
    await until(lambda: audit.where(event_id=event.id, status="ok"), 20, "the new rule's run")
    config.write_text(CONFIG)


async def test_a_pending_approval_survives_an_agent_restart(base: Path, up: AutomatedUp,
                                                            operator: tuple[Client, Audit]) -> None:
    nc, audit = operator
    approval_id = await held(nc, audit, 600)
    await nc.close()
    up.stop()
    again = AutomatedUp(base)
    try:
        nc2 = await again.connect("operator")
        audit2 = Audit()
        await audit2.start(nc2)
        await serving(nc2, "noop")
        assert [a["id"] for a in (await control(nc2, "approvals", {}))["approvals"]] == [approval_id]
        doc, code = await answer(nc2, approval_id, "approve")
        assert code is None and doc["status"] == "ok"
        await until(lambda: audit2.where(id=approval_id, status="ok"), 20, "the approved run after the restart")
        await nc2.close()
    finally:
        again.stop()
