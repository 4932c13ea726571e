"""The agent's composition: its parts start on one exit stack and all stop, in reverse, leaving nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import psutil
import pytest
from nats.js.errors import BadBucketError
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import load_config
from tuxpilot.agent.lock import state_dir_lock
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer


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
