"""Silencing the gate by re-pointing its durable consumer, tried for real against `tuxpilot up`.

A JetStream consumer "create" on an existing durable updates it, filter included: the operator's
credentials may not do it at all, and when someone who may (the agent's own user, a server admin)
does, the gate and the plugins' consumers are put back, and what was stored meanwhile is decided.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from tuxpilot.bus import auth
from tuxpilot.protocol.names import Subjects

from tests.conftest import until
from tests.e2e.test_up import Up

pytestmark = pytest.mark.slow

HOST = "up-host"
GATE = f"gate-{HOST}"
SYSMON = f"sysmon-{HOST}"


async def connect(up: Up, role: str, errors: list[str]) -> Client:
    subjects = Subjects("tuxpilot", HOST)
    user = {"agent": auth.agent_user(subjects), "operator": auth.operator_user(subjects)}[role]
    doc = json.loads(auth.credential_file(up.state, user.name).read_text())

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(up.url, user=doc["user"], password=doc["password"], inbox_prefix=doc["inbox_prefix"],
                              error_cb=on_error, allow_reconnect=False)


async def re_point(js: Any, stream: str, name: str) -> None:
    info = await js.consumer_info(stream, name)
    await js.add_consumer(stream, config=dataclasses.replace(info.config, filter_subjects=["tuxpilot.nobody"]))


async def emit(up: Up, resource: str) -> str:
    done = await asyncio.to_thread(up.cli, "event", "emit", "memory.high", "--value", "97", "--resource", resource)
    assert done.returncode == 0, done.stderr
    event_id: str = json.loads(done.stdout)["id"]
    return event_id


@pytest.fixture
def up(tmp_path: Path) -> Any:
    running = Up(tmp_path / "state")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()


async def test_operator_cannot_re_point_the_gate_and_a_re_pointed_consumer_is_restored(up: Up) -> None:
    errors: list[str] = []
    operator = await connect(up, "operator", errors)
    agent = await connect(up, "agent", [])
    decided: dict[str, str] = {}

    async def on_result(msg: Msg) -> None:
        doc = json.loads(msg.data)
        if doc.get("event_id"):
            decided[doc["event_id"]] = doc["status"]

    await operator.subscribe(f"tuxpilot.result.{HOST}.>", cb=on_result)
    ajs, ojs = agent.jetstream(), operator.jetstream()
    try:
        await until(lambda: bool(up.tree()), 30, "the plugins")
        for _ in range(100):  # the agent creates sysmon's consumer before starting it
            try:
                await ajs.consumer_info("tuxpilot_events", SYSMON)
                break
            except Exception:
                await asyncio.sleep(0.2)
        found = await ajs.consumer_info("tuxpilot_proposals", GATE)
        before, created = found.config, found.created

        # 1. The operator's credentials: every way of naming the gate's consumer in a create is refused.
        body = json.dumps({"stream_name": "tuxpilot_proposals", "config": {
            "name": GATE, "durable_name": GATE, "filter_subject": "tuxpilot.nobody", "ack_policy": "explicit"}})
        for subject in (
            f"$JS.API.CONSUMER.CREATE.tuxpilot_proposals.{GATE}",
            f"$JS.API.CONSUMER.CREATE.tuxpilot_proposals.{GATE}.tuxpilot.nobody",
            "$JS.API.CONSUMER.CREATE.tuxpilot_proposals",  # unnamed: the name is in the body
            f"$JS.API.CONSUMER.DURABLE.CREATE.tuxpilot_proposals.{GATE}",
            f"$JS.API.CONSUMER.DELETE.tuxpilot_proposals.{GATE}",
        ):
            with pytest.raises(NatsTimeout):
                await operator.request(subject, body.encode(), timeout=1)
        await operator.flush()
        await asyncio.sleep(0.2)
        assert any('permissions violation for publish to "$js.api.consumer.' in e.lower() for e in errors), errors
        after = await ajs.consumer_info("tuxpilot_proposals", GATE)
        assert after.created == created, "the gate's consumer was deleted and made again"
        assert differences_of(before, after.config) == []
        # Its own `op_` consumer it may make (and remove); the audit trail it reads without one.
        own = ConsumerConfig(name=f"op_{HOST}", filter_subject=f"tuxpilot.result.{HOST}.>",
                             ack_policy=AckPolicy.NONE)
        await ojs.add_consumer("tuxpilot_audit", config=own)
        await ojs.delete_consumer("tuxpilot_audit", f"op_{HOST}")
        listed = await asyncio.to_thread(up.cli, "audit", "--json")
        assert listed.returncode == 0, listed.stderr

        # 2. The agent's own user re-points the gate: proposals made meanwhile are still decided (handed
        # over by request, or stored and taken once the gate's consumer is restored), and it is restored.
        await re_point(ajs, "tuxpilot_proposals", GATE)
        first = await emit(up, "attack-1")
        await until(lambda: first in decided, 30, "the proposal made while the gate was re-pointed")

        async def restored() -> bool:
            info = await ajs.consumer_info("tuxpilot_proposals", GATE)
            return differences_of(before, info.config) == []

        for _ in range(150):
            if await restored():
                break
            await asyncio.sleep(0.2)
        assert await restored(), "the gate's consumer was not restored"

        # 3. The same for a plugin's consumer (the plugin may not restore it; the agent does).
        await re_point(ajs, "tuxpilot_events", SYSMON)
        second = await emit(up, "attack-2")
        await until(lambda: second in decided, 30, "the event sysmon's consumer skipped while re-pointed")
        print(f"decided after restore: gate={decided[first]} plugin={decided[second]}")
    finally:
        for nc in (operator, agent):
            await nc.close()
        up.proc.send_signal(signal.SIGTERM)
        up.proc.wait(timeout=15)
    assert up.proc.stderr is not None
    log = up.proc.stderr.read()
    assert log.count("consumer.restored") >= 2, log[-3000:]


def differences_of(want: ConsumerConfig, have: ConsumerConfig) -> list[str]:
    from tuxpilot.bus.consumer import differences

    return differences(want, have)
