"""The floods that once kept the agent from starting or stopping, replayed against real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tuxpilot.agent.ledger import Ledger
from tuxpilot.bus import auth
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import NatsConfig, StreamsConfig

from tests.conftest import tuxpilot_exe
from tests.e2e.test_up import Up, wait_gone

pytestmark = pytest.mark.slow

FLOOD = 15_000


async def flood_cooldowns(up: Up, count: int) -> None:
    """What 15,000 proposals of one action, each with a new `resource`, leave behind: as many cooldown keys."""
    subjects = Subjects("tuxpilot", "up-host")
    user_file = auth.credential_file(up.state, auth.agent_user(subjects).name)
    nc = await bus.connect(NatsConfig(user_file=user_file), up.url, name="flood")
    try:
        ledger = Ledger(nc, subjects, StreamsConfig())
        await ledger.start()
        at = time.time()
        for start in range(0, count, 500):
            await asyncio.gather(
                *(ledger.save_cooldown(f"sysmon.top_processes:res-{i}", at, 3600) for i in range(start, start + 500))
            )
        info = await nc.jetstream().stream_info("KV_tuxpilot_cooldowns")
        assert info.state.messages >= count
    finally:
        await nc.close()


def test_up_comes_up_with_15000_cooldown_keys_and_stops_on_sigterm(tmp_path: Path) -> None:
    first = Up(tmp_path / "state")
    try:
        asyncio.run(flood_cooldowns(first, FLOOD))
    finally:
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(30)
    started = time.monotonic()
    again = Up(tmp_path / "state")  # fails unless the ready line comes within 30 s
    ready_s = time.monotonic() - started
    try:
        stopping = time.monotonic()
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(timeout=15) == 0
        print(f"cooldown_keys={FLOOD} ready_s={ready_s:.2f} stop_s={time.monotonic() - stopping:.2f}")
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
            again.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_start_up_stalled_on_a_frozen_server(tmp_path: Path, sig: signal.Signals) -> None:
    # A real nats-server, frozen (SIGSTOP): the TCP connection is accepted, nothing is ever answered.
    server = NatsServer(tmp_path / "nats").start()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    env = {
        **os.environ,
        "TUXPILOT_NATS_URL": server.url,
        "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
        "TUXPILOT_HOST_ID": "stalled",
        "TUXPILOT_RUN_PLUGINS": "[]",
    }
    env.pop("TUXPILOT_CONFIG", None)
    agent = subprocess.Popen(
        [tuxpilot_exe(), "agent"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        time.sleep(4)  # past the connect timeout: the agent is retrying, stuck in start-up
        assert agent.poll() is None, "the agent gave up instead of waiting for its server"
        signalled = time.monotonic()
        agent.send_signal(sig)
        agent.wait(timeout=10)
        assert agent.stdout is not None
        assert "agent.start_interrupted" in agent.stdout.read()
        print(f"signal={sig.name} exit_s={time.monotonic() - signalled:.2f}")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        os.kill(server.pid, signal.SIGCONT)
        server.stop()


def test_sigterm_with_the_embedded_server_frozen_ends_up_and_everything_it_started(tmp_path: Path) -> None:
    # Every part's stop waits on the frozen server (drain, plugins' own drains): the stop limit ends it.
    up = Up(tmp_path / "state")
    try:
        children = up.tree()
        (server,) = [p for p in children if "nats-server" in " ".join(p.cmdline())]
        server.suspend()
        signalled = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        up.proc.wait(timeout=15)
        print(f"exit_s={time.monotonic() - signalled:.2f} rc={up.proc.returncode}")
        assert wait_gone(children) == [], "processes left behind"
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
