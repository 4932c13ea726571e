"""Reading the audit trail back: exact, every time, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from nats.aio.client import Client
from tuxpilot.agent import audit
from tuxpilot.agent.config import Config
from tuxpilot.bus.streams import ensure_streams
from tuxpilot.protocol.errors import BadRequest
from tuxpilot.protocol.models import Result, now
from tuxpilot.protocol.names import Subjects

from tests.conftest import tuxpilot_exe


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=env, timeout=60)


async def _record(nc: Client, subjects: Subjects, n: int, *, status: str = "ok") -> None:
    js = nc.jetstream()
    for i in range(n):
        result = Result(
            status=status, host=subjects.host, plugin="demo", action="echo", message=f"record {i}", time=now()
        )
        await js.publish(subjects.result("demo", "echo"), result.to_json())


async def test_reading_n_records_back_gives_n_every_time(nc: Client, config: Config) -> None:
    # The listing used to stop early at random (0 or all of them) when the push consumer had
    # already delivered everything by the time its info was asked.
    subjects = Subjects.of(config)
    await ensure_streams(nc.jetstream(), subjects, config.streams)
    for n in (2, 7):
        await _record(nc, subjects, n if n == 2 else n - 2)
        counts = [len(await audit.read(nc, subjects)) for _ in range(20)]
        assert counts == [n] * 20


async def test_filters_limit_and_an_empty_trail(nc: Client, config: Config) -> None:
    subjects = Subjects.of(config)
    await ensure_streams(nc.jetstream(), subjects, config.streams)
    assert await audit.read(nc, subjects) == []
    await _record(nc, subjects, 3)
    await _record(nc, subjects, 2, status="refused")
    assert len(await audit.read(nc, subjects, status="refused")) == 2
    newest = await audit.read(nc, subjects, limit=2)
    assert [r["status"] for r in newest] == ["refused", "refused"]
    assert await audit.read(nc, subjects, plugin="other") == []
    with pytest.raises(BadRequest, match="bogus"):
        await audit.read(nc, subjects, status="bogus")


async def test_audit_json_from_the_command_line_is_exact(nc: Client, config: Config, tmp_path: Path) -> None:
    subjects = Subjects.of(config)
    await ensure_streams(nc.jetstream(), subjects, config.streams)
    await _record(nc, subjects, 2)
    env = {**os.environ, "TUXPILOT_NATS_URL": config.nats.url or "", "TUXPILOT_HOST_ID": config.host_id,
           "TUXPILOT_STATE_DIR": str(tmp_path / "state"), "TUXPILOT_CONFIG": "/dev/null"}
    for _ in range(5):
        done = await asyncio.to_thread(run, env, "audit", "--json")
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)) == 2

    bogus = await asyncio.to_thread(run, env, "audit", "--status", "bogus")
    assert bogus.returncode == 2
    assert "bogus" in bogus.stderr and "refused" in bogus.stderr
