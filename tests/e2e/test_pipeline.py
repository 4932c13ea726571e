"""End to end: a reading crosses a threshold, sysmon proposes, the gate executes, the result is recorded.

The agent runs in-process against the test's nats-server; sysmon runs as its own process, started
and supervised by the agent's plugin host, exactly as under `tuxpilot up`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import Config
from tuxpilot.agent.monitor import Reading
from tuxpilot.bus.registry import live_instances
from tuxpilot.protocol.models import Usage

pytestmark = pytest.mark.slow


class Readings:
    """A reader the test turns like a dial; the monitor reads it through its normal code path."""

    def __init__(self, real: Reading):
        self.memory = 20.0
        self.real = real

    def __call__(self) -> Reading:
        total = self.real.memory.total
        used = int(total * self.memory / 100)
        usage = Usage(total=total, used=used, available=total - used, percent=self.memory)
        return replace(self.real, memory=usage)


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def running(config: Config, nc: Client) -> AsyncIterator[tuple[Agent, Readings]]:
    from tuxpilot.agent.monitor import read_system

    config.monitor.interval_s = 0.1
    config.monitor.memory.sustain_s = 0
    dial = Readings(read_system(config.monitor))
    agent = Agent(config, embedded=False, reader=dial)
    await agent.start()

    async def sysmon_live() -> bool:
        return any(i["name"] == "sysmon" for i in await live_instances(nc, "test-host", wait=0.1))

    try:
        await wait_for(sysmon_live, 30)
        yield agent, dial
    finally:
        await agent.stop()


async def test_memory_high_ends_in_an_ok_result_with_real_process_data(
    running: tuple[Agent, Readings], nc: Client
) -> None:
    _, dial = running
    events = await nc.subscribe("tuxpilot.evt.test-host.memory.*")
    proposed: asyncio.Queue[Msg] = asyncio.Queue()
    for subject in ("tuxpilot.proposal.test-host.*", "tuxpilot.propose.test-host.*"):  # stored, or handed over
        await nc.subscribe(subject, cb=proposed.put)
    results = await nc.subscribe("tuxpilot.result.test-host.sysmon.top_processes")
    dial.memory = 96.0

    event = json.loads((await events.next_msg(timeout=10)).data)
    assert event["type"] == "memory.high" and event["value"] == 96.0 and event["source"] == "monitor"
    proposal = json.loads((await asyncio.wait_for(proposed.get(), 10)).data)
    assert proposal["event_id"] == event["id"] and proposal["plugin"] == "sysmon"
    assert proposal["actions"][0]["action"] == "top_processes"
    result = json.loads((await results.next_msg(timeout=15)).data)
    assert result["status"] == "ok", result
    assert result["event_id"] == event["id"]
    processes = result["data"]["processes"]
    assert processes and all("pid" in p and "memory_percent" in p for p in processes)
    assert processes == sorted(processes, key=lambda p: p["memory_percent"], reverse=True)

    dial.memory = 50.0
    cleared = json.loads((await events.next_msg(timeout=10)).data)
    assert cleared["type"] == "memory.ok"


async def test_a_killed_plugin_process_is_restarted(running: tuple[Agent, Readings], nc: Client) -> None:
    import os
    import signal

    agent, _ = running
    assert agent.host is not None
    sysmon = agent.host.plugins["sysmon"]
    first_pid = sysmon.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)

    async def back() -> bool:
        return sysmon.pid != first_pid and any(
            i["name"] == "sysmon" for i in await live_instances(nc, "test-host", wait=0.1)
        )

    await wait_for(back, 30)
    assert sysmon.restarts == 1
    reply = await nc.request("tuxpilot.act.test-host.sysmon.top_processes", b'{"n": 2}', timeout=10)
    assert json.loads(reply.data)["status"] == "ok"
