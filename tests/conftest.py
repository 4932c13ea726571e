"""Fixtures: a real nats-server per test (JetStream in a temp dir), a client, and a config pointing at it."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from tuxpilot.agent.config import Config, load_config
from tuxpilot.bus.server import NatsServer

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(component: str, available: bool, reason: str) -> None:
    """Skip when a component is missing on a laptop; in CI a missing component is a failure."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{component} is required in CI: {reason}")
    pytest.skip(f"{component} not available: {reason}")


async def until(predicate: Any, limit: float, what: str) -> None:
    """Wait until `predicate()` holds; fail naming `what` after `limit` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url, name="test")
    yield client
    await client.close()


@pytest.fixture
def config(tmp_path: Path, nats_server: NatsServer) -> Config:
    """A host config on the test server: host `test-host`, state in the temp dir."""
    return load_config(
        environ={
            "TUXPILOT_NATS_URL": nats_server.url,
            "TUXPILOT_HOST_ID": "test-host",
            "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
        }
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """The project built as a wheel, once per run, for the tests that install it into a fresh venv."""
    import subprocess
    import sys

    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(repo_root)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(dist.glob("tuxpilot-*.whl"))


def tuxpilot_exe() -> str:
    """The installed console script, next to the running interpreter."""
    import sys

    here = Path(sys.executable).parent / "tuxpilot"
    return str(here) if here.exists() else (shutil.which("tuxpilot") or "tuxpilot")
