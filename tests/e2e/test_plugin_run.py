"""`tuxpilot plugin run PATH` against a default `tuxpilot up` (generated authorization on): the agent
loads the folder's manifest itself and gives the plugin a user of its own; the plugin serves, proposes,
and the gate decides from the manifest the host loaded."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import tuxpilot_exe
from tests.e2e.test_up import Up

pytestmark = pytest.mark.slow

HELLO = Path(__file__).resolve().parent.parent / "plugins" / "hello"


class Running:
    def __init__(self, up: Up, folder: Path):
        self.proc = subprocess.Popen([tuxpilot_exe(), "plugin", "run", str(folder)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=up.env)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving on" in line or time.monotonic() > deadline:
                break
        assert any("serving on" in line for line in self.lines), "".join(self.lines) + self._rest()

    def _rest(self) -> str:
        self.stop()
        return self.proc.stdout.read() if self.proc.stdout else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(params=["auth", "no-auth"])
def up(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Up]:
    if request.param == "no-auth":  # embedded.auth = false: the agent still loads the manifest
        monkeypatch.setenv("TUXPILOT_EMBEDDED_AUTH", "false")
    running = Up(tmp_path / "state")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()


def test_a_plugin_run_by_hand_just_works_against_the_local_up(up: Up, tmp_path: Path) -> None:
    folder = tmp_path / "hello"
    shutil.copytree(HELLO, folder)
    plugin = Running(up, folder)
    try:
        called = up.cli("call", "up-host", "hello", "greet", '{"name": "author"}')
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout)["data"] == {"greeting": "hello, author"}

        # Its proposal goes through the gate, which knows the manifest the agent loaded from the folder.
        assert up.cli("event", "emit", "demo.ping", "--resource", "bus").returncode == 0
        deadline = time.monotonic() + 20
        while True:
            audit = up.cli("audit", "--plugin", "hello", "--json")
            records = json.loads(audit.stdout) if audit.returncode == 0 else []
            if any(r.get("status") == "ok" and r.get("params") == {"name": "bus"} for r in records) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert any(r.get("status") == "ok" and r.get("params") == {"name": "bus"} for r in records), records

        # Loading again (a second `plugin run`, a restart of the author's loop) reuses its user.
        second = Running(up, folder)
        assert second.stop() == 0
    finally:
        assert plugin.stop() == 0
        output = "".join(plugin.lines) + (plugin.proc.stdout.read() if plugin.proc.stdout else "")
    assert "Authorization Violation" not in output and "Permissions Violation" not in output, output


def test_a_plugin_run_by_hand_may_not_take_the_name_of_one_the_agent_runs(up_auth: Up, tmp_path: Path) -> None:
    up = up_auth
    impostor = tmp_path / "sysmon"
    shutil.copytree(HELLO, impostor)
    manifest = impostor / "plugin.toml"
    manifest.write_text(manifest.read_text().replace('name = "hello"', 'name = "sysmon"'))
    done = subprocess.run([tuxpilot_exe(), "plugin", "run", str(impostor)], capture_output=True, text=True,
                          env=up.env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "runs plugin 'sysmon'" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.fixture
def up_auth(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path / "state")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()


async def test_only_the_operator_may_ask_the_agent_to_load_a_plugin(up_auth: Up, tmp_path: Path) -> None:
    up = up_auth
    # A running plugin that could make the agent load a folder would get itself a second identity.
    import asyncio

    import nats
    from tuxpilot.protocol.launch import CredentialFile

    creds = CredentialFile.model_validate_json(
        (up.state / "credentials" / "tuxpilot-up-host-plugin-sysmon.json").read_text()
    )
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    plugin = await nats.connect(up.url, user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix,
                                error_cb=on_error, allow_reconnect=False)
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await plugin.request("tuxpilot.agent.up-host.load_plugin", json.dumps({"folder": str(HELLO)}).encode(),
                                 timeout=1)
        await asyncio.sleep(0.2)
    finally:
        await plugin.close()
    assert any('publish to "tuxpilot.agent.up-host.load_plugin"' in e for e in errors), errors
    assert not (up.state / "credentials" / "tuxpilot-up-host-plugin-hello.json").exists()
