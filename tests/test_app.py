"""The agent's composition: its parts start on one exit stack and all stop, in reverse, leaving nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import load_config
from tuxpilot.bus import connect as bus


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
