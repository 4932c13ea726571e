"""The agent's composition: its parts start on one exit stack and all stop, in reverse, leaving nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import psutil
import pytest
from nats.js.errors import BadBucketError
from structlog.testing import capture_logs
from tuxpilot.agent import app
from tuxpilot.agent.app import Agent, enter
from tuxpilot.agent.config import load_config
from tuxpilot.agent.lock import state_dir_lock
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer
from tuxpilot.lifetime import cancel


async def test_an_embedded_agent_stops_every_part_it_started(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "TUXPILOT_HOST_ID": "test-host",
            "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
            "TUXPILOT_MONITOR_INTERVAL_S": "60",
        }
    )
    before = set(asyncio.all_tasks())
    async with Agent(config) as agent:
        assert agent.server is not None and agent.nc is not None and agent.host is not None
        server = psutil.Process(agent.server.pid)
        assert bus.url_file(config.state_dir).read_text().strip() == agent.url
        assert agent.nc.is_connected
        nc = agent.nc
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert not bus.url_file(config.state_dir).exists()
    assert nc.is_closed
    assert not psutil.Process().children(recursive=True), "a plugin or server outlived the agent"
    left = {t for t in asyncio.all_tasks() if t not in before and not t.done()} - {asyncio.current_task()}
    assert not left, f"tasks left running: {left}"


async def test_a_start_that_fails_half_way_stops_what_it_had_started(nats_server: NatsServer, tmp_path: Path) -> None:
    """A stream in the way of the plugin-state bucket (named like it, but not a bucket) makes start fail
    after the state dir lock and the connection: both are released, and the error goes out."""
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name="KV_tuxpilot_plugin_state", subjects=["$KV.tuxpilot_plugin_state.>"])
    finally:
        await nc.close()
    config = load_config(environ={
        "TUXPILOT_NATS_URL": nats_server.url, "TUXPILOT_HOST_ID": "test-host",
        "TUXPILOT_STATE_DIR": str(tmp_path / "state"), "TUXPILOT_MONITOR_ENABLED": "false",
        "TUXPILOT_RUN_PLUGINS": "[]",
    })
    agent = Agent(config, embedded=False)
    with pytest.raises(BadBucketError):
        await agent.start()
    assert agent.nc is not None and agent.nc.is_closed
    with state_dir_lock(config.state_dir):  # free again
        pass
    await agent.stop()  # nothing left to stop: a no-op


async def test_a_part_that_cannot_stop_is_cut_off_and_the_rest_still_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part whose stop never returns (here one that waits for an event nobody sets) is logged with where
    it waits and cancelled after `PART_STOP_LIMIT_S`; the connection and the embedded server below it
    still stop, so `Agent.stop` returns instead of hanging its caller."""
    monkeypatch.setattr(app, "PART_STOP_LIMIT_S", 0.5)
    config = load_config(environ={
        "TUXPILOT_HOST_ID": "test-host", "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
        "TUXPILOT_MONITOR_ENABLED": "false", "TUXPILOT_RUN_PLUGINS": "[]",
    })
    never = asyncio.Event()

    @contextlib.asynccontextmanager
    async def stuck_part() -> AsyncIterator[None]:
        yield
        await never.wait()

    agent = Agent(config)
    await agent.start()
    assert agent.server is not None and agent._stack is not None
    server = psutil.Process(agent.server.pid)
    await enter(agent._stack, stuck_part())
    with capture_logs() as logs:
        await asyncio.wait_for(agent.stop(), 20)
    cut = [e for e in logs if e["event"] == "agent.part_stop_timeout"]
    assert [e["part"] for e in cut] == ["stuck_part"]
    assert "stuck_part" in cut[0]["waiting_in"]
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert agent.nc is not None and agent.nc.is_closed


async def test_a_loop_that_swallows_its_cancellation_is_still_stopped() -> None:
    """Python 3.11's `asyncio.wait_for` (under nats-py's `next_msg`, so under every pull consumer) returns
    its result instead of raising when a cancellation meets it: a pull loop then runs on, and a stop that
    cancelled it once and awaited it hung for good. `cancel` cancels again until the task has ended."""
    swallowed = 0

    async def pull_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as wait_for does when what it waited for finished at the same moment

    task = asyncio.create_task(pull_loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel(task), 5)
    assert task.cancelled() and swallowed == 1
