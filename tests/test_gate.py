"""The gate: each step alone, and the whole pipeline against a real server and a real SDK plugin."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from nats.aio.client import Client
from tuxpilot.agent.config import Config
from tuxpilot.agent.gate import Cooldowns, Gate, action_id, parse_proposal
from tuxpilot.agent.registry import Registry
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.models import Event, Proposal, ProposedAction, Result, now
from tuxpilot.runtimes.settings import PluginSettings
from tuxpilot.sdk.plugin import ActionError, Context, Plugin

DEMO = {
    "name": "demo",
    "version": "1.0.0",
    "description": "test plugin",
    "category": "custom",
    "runtime": "python",
    "entry_point": "plugin.py",
    "api_version": "1",
    "permissions": ["filesystem_read", "system_access"],
    "subscribes": ["demo.*"],
    "actions": {
        "echo": {
            "permission": "filesystem_read",
            "params": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"word": {"type": "string", "maxLength": 20}},
            },
        },
        "slow": {"permission": "filesystem_read", "timeout_s": 0.3},
        "boom": {"permission": "filesystem_read"},
        "reboot": {"permission": "system_access"},
        "prune": {"permission": "system_access", "dry_run": True},
    },
}


def demo_plugin() -> tuple[Plugin, list[str]]:
    plugin = Plugin(Manifest.from_doc(DEMO))
    calls: list[str] = []

    @plugin.action("echo")
    async def echo(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
        calls.append("echo")
        return {"word": params.get("word", ""), "action_id": ctx.action_id}

    @plugin.action("slow")
    async def slow(params: dict[str, Any], ctx: Context) -> None:
        calls.append("slow")
        await asyncio.sleep(5)

    @plugin.action("boom")
    def boom(params: dict[str, Any], ctx: Context) -> None:
        raise ActionError("no such thing", code="not_found")

    @plugin.action("reboot")
    def reboot(params: dict[str, Any], ctx: Context) -> str:
        calls.append("reboot")
        return "rebooted"

    @plugin.action("prune")
    def prune(params: dict[str, Any], ctx: Context) -> str:
        calls.append("prune")
        return "pruned"

    return plugin, calls


def proposal(action: str, params: dict[str, Any] | None = None, **kw: Any) -> bytes:
    event = kw.pop("event", None) or Event.new("demo.tick", "test-host")
    return Proposal(
        event_id=event.id,
        plugin=kw.pop("plugin", "demo"),
        event=event,
        actions=[ProposedAction(plugin=kw.pop("owner", "demo"), action=action, params=params or {}, **kw)],
    ).to_json()


class Rig:
    def __init__(self, nc: Client, config: Config, plugin: Plugin, calls: list[str], gate: Gate):
        self.nc, self.config, self.plugin, self.calls, self.gate = nc, config, plugin, calls, gate

    async def one(self, raw: bytes) -> Result:
        results = await self.gate.handle(raw)
        assert len(results) == 1
        return results[0]

    async def one_from(self, raw: bytes, proposer: str) -> Result:
        """As if it came on `proposer`'s proposal subject."""
        results = await self.gate.handle(raw, proposer)
        assert len(results) == 1
        return results[0]


@pytest.fixture
async def rig(nc: Client, config: Config) -> AsyncIterator[Rig]:
    config.gate.cooldown_s = 0
    plugin, calls = demo_plugin()
    await plugin.start(nc, config)
    registry = Registry(nc, plugin.running.subjects, {"demo": plugin.manifest})
    await registry.start()
    gate = Gate(nc, config, registry)
    await gate.start()
    yield Rig(nc, config, plugin, calls, gate)
    await gate.stop()
    await registry.stop()
    await plugin.stop()


# -- pure steps ----------------------------------------------------------------------------------


def test_action_id_is_deterministic_and_param_order_free() -> None:
    assert action_id("e", "p", "a", {"x": 1, "y": 2}) == action_id("e", "p", "a", {"y": 2, "x": 1})
    assert action_id("e", "p", "a", {"x": 1}) != action_id("e2", "p", "a", {"x": 1})


def test_cooldown_claims_then_refuses_then_frees() -> None:
    c = Cooldowns()
    assert c.claim("k", 100.0, 60) is None
    assert c.claim("k", 130.0, 60) == pytest.approx(30.0)
    assert c.claim("other", 130.0, 60) is None
    assert c.claim("k", 161.0, 60) is None


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "bad_request"),
        (b"\xff\xfe", "bad_request"),
        (b"[]", "invalid_params"),
        (b'{"event_id": "e", "plugin": "demo", "actions": []}', "invalid_params"),
        (b'{"event_id": "e", "plugin": "demo", "actions": [{"plugin": "demo", "action": "echo"}], "x": 1}',
         "invalid_params"),
        (b"[" * 100_000 + b"]" * 100_000, "payload_too_large"),
    ],
)
def test_parse_proposal_names_what_is_wrong(raw: bytes, code: str) -> None:
    from tuxpilot.protocol.errors import TuxPilotError

    with pytest.raises(TuxPilotError) as caught:
        parse_proposal(raw, max_payload=64 * 1024)
    assert caught.value.code == code


# -- the pipeline against a real server ------------------------------------------------------------


async def test_permitted_action_executes_and_result_is_published(rig: Rig) -> None:
    sub = await rig.nc.subscribe("tuxpilot.result.test-host.demo.echo")
    result = await rig.one(proposal("echo", {"word": "hi"}))
    assert result.status == "ok"
    assert result.data["word"] == "hi"
    assert result.data["action_id"] == result.id  # the plugin saw the gate's action id
    published = json.loads((await sub.next_msg(timeout=2)).data)
    assert published["status"] == "ok"
    assert published["proposed_by"] == "demo" and published["plugin"] == "demo" and published["action"] == "echo"


async def test_proposal_through_the_bus_reaches_the_result_subject(rig: Rig) -> None:
    sub = await rig.nc.subscribe("tuxpilot.result.test-host.>")
    await rig.nc.publish("tuxpilot.proposal.test-host.demo", proposal("echo", {"word": "bus"}))
    published = json.loads((await sub.next_msg(timeout=3)).data)
    assert published["status"] == "ok" and published["data"]["word"] == "bus"


async def test_ungranted_permission_is_refused_naming_it(rig: Rig) -> None:
    result = await rig.one(proposal("reboot"))  # system_access is dangerous: never granted by default
    assert result.status == "refused"
    assert result.reason == "permission_not_granted"
    assert "system_access" in (result.message or "")
    assert "reboot" not in rig.calls


async def test_explicit_grant_lets_a_dangerous_action_run(rig: Rig) -> None:
    rig.config.plugins["demo"] = PluginSettings(permissions=["filesystem_read", "system_access"])
    result = await rig.one(proposal("reboot"))
    assert result.status == "ok" and rig.calls == ["reboot"]


async def test_revoked_permission_refuses_even_a_safe_action(rig: Rig) -> None:
    rig.config.plugins["demo"] = PluginSettings(permissions=[])
    result = await rig.one(proposal("echo"))
    assert result.status == "refused" and "filesystem_read" in (result.message or "")


async def test_dry_run_actions_are_recorded_not_executed(rig: Rig) -> None:
    rig.config.gate.dry_run = True
    result = await rig.one(proposal("echo"))
    assert result.status == "dry_run"
    assert rig.calls == []


async def test_manifest_dry_run_action_runs_dry_until_granted(rig: Rig) -> None:
    dry = await rig.one(proposal("prune"))
    assert dry.status == "dry_run" and dry.reason == "permission_not_granted"
    rig.config.plugins["demo"] = PluginSettings(permissions=["filesystem_read", "system_access"])
    done = await rig.one(proposal("prune"))
    assert done.status == "ok" and rig.calls == ["prune"]


async def test_cooldown_suppresses_a_repeat_on_the_same_resource(rig: Rig) -> None:
    rig.config.gate.cooldown_s = 60
    first = await rig.one(proposal("echo", resource="/var"))
    again = await rig.one(proposal("echo", resource="/var"))
    elsewhere = await rig.one(proposal("echo", resource="/home"))
    assert [first.status, again.status, elsewhere.status] == ["ok", "suppressed", "ok"]
    assert again.reason == "cooldown"
    assert rig.calls == ["echo", "echo"]


async def test_invalid_params_are_refused_before_the_plugin_sees_them(rig: Rig) -> None:
    result = await rig.one(proposal("echo", {"word": 5}))
    assert result.status == "refused" and result.reason == "invalid_params"
    assert result.error is not None and result.error.details
    assert rig.calls == []


async def test_unknown_action_and_plugin_and_foreign_action_are_refused(rig: Rig) -> None:
    unknown_action = await rig.one(proposal("nope"))
    assert (unknown_action.status, unknown_action.reason) == ("refused", "unknown_action")
    assert "echo" in (unknown_action.message or "")
    unknown_plugin = await rig.one(proposal("echo", plugin="ghost", owner="ghost"))
    assert (unknown_plugin.status, unknown_plugin.reason) == ("refused", "unknown_plugin")
    foreign = await rig.one(proposal("echo", plugin="ghost", owner="demo"))
    assert (foreign.status, foreign.reason) == ("refused", "foreign_action")


async def test_expired_event_is_not_acted_on(rig: Rig) -> None:
    old = Event.new("demo.tick", "test-host", ttl=1).model_copy(update={"time": now() - timedelta(seconds=5)})
    result = await rig.one(proposal("echo", event=old))
    assert result.status == "expired" and rig.calls == []


async def test_hanging_plugin_gives_timeout_and_gate_stays_responsive(rig: Rig) -> None:
    slow = asyncio.create_task(rig.one(proposal("slow")))
    quick = await rig.one(proposal("echo", {"word": "meanwhile"}))
    assert quick.status == "ok"
    result = await slow
    assert result.status == "timeout"


async def test_plugin_error_is_recorded_with_its_error_document(rig: Rig) -> None:
    result = await rig.one(proposal("boom"))
    assert result.status == "error"
    assert result.error is not None and result.error.code == "not_found"
    assert result.message == "no such thing"


async def test_stopped_plugin_gives_unavailable(rig: Rig) -> None:
    await rig.plugin.stop()
    result = await rig.one(proposal("echo"))
    assert result.status == "unavailable" and result.reason == "no_responders"


async def test_garbage_on_the_proposal_subject_is_refused_and_recorded(rig: Rig) -> None:
    sub = await rig.nc.subscribe("tuxpilot.result.test-host.gate.proposal")
    await rig.nc.publish("tuxpilot.proposal.test-host.demo", b"\x00garbage")
    record = json.loads((await sub.next_msg(timeout=2)).data)
    assert record["status"] == "refused" and record["reason"] == "bad_request"
    # and the gate still serves good traffic
    assert (await rig.one(proposal("echo"))).status == "ok"


async def test_a_reply_too_large_for_the_server_becomes_an_error_reply(nc: Client, config: Config) -> None:
    plugin = Plugin(Manifest.from_doc({**DEMO, "name": "big", "subscribes": [], "actions": {"dump": {}}}))

    @plugin.action("dump")
    def dump(params: dict[str, Any], ctx: Context) -> str:
        return "x" * (nc.max_payload + 10)

    await plugin.start(nc, config)
    try:
        reply = await nc.request("tuxpilot.exec.test-host.big.dump", b"", timeout=5)
        assert json.loads(reply.data)["code"] == "payload_too_large"
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "413"
    finally:
        await plugin.stop()


async def test_a_replayed_action_id_answers_the_same_action_only(rig: Rig) -> None:
    """The SDK's replay cache is keyed by action and id: an id reused for another action is refused."""
    headers = {"Tuxpilot-Action-Id": "reused-id-1"}
    first = await rig.nc.request("tuxpilot.exec.test-host.demo.echo", b'{"word": "one"}', timeout=2, headers=headers)
    assert json.loads(first.data)["data"]["word"] == "one"
    again = await rig.nc.request("tuxpilot.exec.test-host.demo.echo", b'{"word": "two"}', timeout=2, headers=headers)
    assert json.loads(again.data) == json.loads(first.data)  # replayed, not run again
    other = await rig.nc.request("tuxpilot.exec.test-host.demo.reboot", b"{}", timeout=2, headers=headers)
    assert other.headers is not None and other.headers["Nats-Service-Error-Code"] == "409"
    assert json.loads(other.data)["code"] == "conflict"
    assert rig.calls == ["echo"]


async def test_a_body_naming_another_plugin_is_impersonation_recorded_under_the_real_proposer(rig: Rig) -> None:
    result = await rig.one_from(proposal("echo", plugin="sysmon", owner="demo"), proposer="demo")
    assert (result.status, result.reason, result.proposed_by) == ("refused", "impersonation", "demo")
    assert rig.calls == []


async def test_large_params_are_recorded_as_their_size_and_hash(rig: Rig) -> None:
    result = await rig.one(proposal("echo", {"word": "x" * 10_000}))  # too long for the schema: refused
    assert result.status == "refused" and result.params is None
    assert result.params_bytes is not None and result.params_bytes > 10_000
    assert result.params_sha256 is not None and len(result.params_sha256) == 64
    assert len(result.to_json()) < 4096


def test_rate_windows_admit_the_limit_and_summarise_the_rest_once() -> None:
    from tuxpilot.agent.rates import ProposalRates

    rates = ProposalRates()
    admitted = [rates.admit("p", f"id{i}", at=100.0 + i * 0.001, limit=10, window_s=5) for i in range(1000)]
    assert admitted.count(True) == 10
    assert rates.admit("other", "x", at=100.5, limit=10, window_s=5)  # another plugin is not held back
    assert rates.due(now=108.0) == []  # the window is not over (and a window's grace after it)
    [summary] = rates.due(now=111.0)
    assert (summary.plugin, summary.dropped, summary.first_dropped, summary.last_dropped) == ("p", 990, "id10", "id999")
    # A gate far behind still finds proposals stored in that window: counted against it, not admitted anew.
    assert not rates.admit("p", "late", at=103.0, limit=10, window_s=5)
    [again] = rates.due(now=112.0)
    assert (again.dropped, again.summaries) == (1, 1)
    assert rates.due(now=200.0) == [] and rates.admit("p", "new", at=200.0, limit=10, window_s=5)


async def test_an_operator_call_passes_the_steps_cooldown_only_when_configured(rig: Rig) -> None:
    echo = "tuxpilot.act.test-host.demo.echo"
    rig.config.gate.cooldown_s = 60
    first = await rig.nc.request(echo, b'{"word": "a"}', timeout=5)
    again = await rig.nc.request(echo, b'{"word": "a"}', timeout=5)
    assert [json.loads(r.data)["status"] for r in (first, again)] == ["ok", "ok"]  # proposals' pacing only
    rig.config.gate.operator_cooldowns = True
    await rig.nc.request(echo, b"{}", timeout=5)
    paced = await rig.nc.request(echo, b"{}", timeout=5)
    assert paced.headers is not None and paced.headers["Nats-Service-Error-Code"] == "429"
    assert json.loads(paced.data)["code"] == "cooldown"
    rig.config.gate.dry_run = True
    rig.config.gate.operator_cooldowns = False
    dry = await rig.nc.request(echo, b"{}", timeout=5)
    assert json.loads(dry.data)["status"] == "dry_run" and not (dry.headers or {}).get("Nats-Service-Error-Code")
    refused = await rig.nc.request("tuxpilot.act.test-host.demo.reboot", b"{}", timeout=5)
    assert json.loads(refused.data)["code"] == "permission_not_granted"
    assert rig.calls == ["echo", "echo", "echo"]
