"""`tuxpilot up` as a user runs it: a real subprocess with its embedded nats-server and plugins."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import tuxpilot_exe

pytestmark = pytest.mark.slow

URL_LINE = re.compile(r"up on (nats://127\.0\.0\.1:\d+)")


class Up:
    def __init__(self, state: Path, **extra: str):
        self.state = state
        env = {
            **os.environ,
            "TUXPILOT_STATE_DIR": str(state),
            "TUXPILOT_HOST_ID": "up-host",
            "TUXPILOT_MONITOR_INTERVAL_S": "0.5",
            **extra,
        }
        env.pop("TUXPILOT_NATS_URL", None)
        env.pop("TUXPILOT_CONFIG", None)
        self.env = env
        self.proc = subprocess.Popen(
            [tuxpilot_exe(), "up"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.url = self._read_url()

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = URL_LINE.search(line)
            if m:
                return m.group(1)
        self.proc.kill()
        raise AssertionError(f"no URL line; stderr: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=self.env, timeout=timeout)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path / "state")
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()


def wait_gone(processes: list[psutil.Process], timeout: float = 15) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_server_and_plugins_and_stops_them_all(up: Up, sig: signal.Signals) -> None:
    assert (up.state / "nats.url").read_text().strip() == up.url
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = " ".join(" ".join(p.cmdline()) for p in up.tree())
        if "nats-server" in names and "tuxpilot.sdk.process" in names:
            break
        time.sleep(0.2)
    children = up.tree()
    cmdlines = [" ".join(p.cmdline()) for p in children]
    assert any("nats-server" in c for c in cmdlines), cmdlines
    assert any("tuxpilot.sdk.process" in c and "sysmon" in c for c in cmdlines), cmdlines

    up.proc.send_signal(sig)
    assert up.proc.wait(timeout=30) == 0
    assert wait_gone(children) == [], "orphans left behind"
    assert not (up.state / "nats.url").exists()


def test_cli_finds_the_local_server_and_calls_actions(up: Up) -> None:
    # `tuxpilot call` finds the server through the state dir; no URL is given.
    deadline = time.monotonic() + 30
    while True:
        done = up.cli("call", "up-host", "sysmon", "top_processes", '{"n": 3}')
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["data"]["processes"]) == 3

    bad = up.cli("call", "up-host", "sysmon", "top_processes", '{"n": "three"}')
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["code"] == "invalid_params"

    unknown = up.cli("call", "up-host", "sysmon", "no_such_action")
    assert unknown.returncode == 3
    assert "top_processes" in unknown.stderr and "process_tree" in unknown.stderr

    emitted = up.cli("event", "emit", "cpu.high", "--value", "97")
    assert emitted.returncode == 0, emitted.stderr
    assert json.loads(emitted.stdout)["host"] == "up-host"

    listed = up.cli("plugin", "list", "--live", "--json")
    assert listed.returncode == 0, listed.stderr
    sysmon = next(p for p in json.loads(listed.stdout) if p["name"] == "sysmon")
    assert sysmon["running"] == 1

    # `status` says who each running instance really is, as the process itself reports it.
    state = up.cli("status", "--json")
    assert state.returncode == 0, state.stderr
    (instance,) = [r for r in json.loads(state.stdout)["running"] if r["plugin"] == "sysmon"]
    assert instance["host"] == "up-host"
    assert instance["user"] == psutil.Process(int(instance["pid"])).username()

    up.proc.send_signal(signal.SIGTERM)
    up.proc.wait(timeout=30)
    assert up.proc.stdout is not None
    shown = up.proc.stdout.read()
    assert "cpu.high" in shown and "sysmon.top_processes" in shown


def test_bad_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[monitor.memory]\nthreshold = 'lots'\n")
    done = subprocess.run([tuxpilot_exe(), "--config", str(conf), "up"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "monitor.memory.threshold" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    env = {**os.environ, "TUXPILOT_GATE_DRY_RUN": "perhaps"}
    done = subprocess.run([tuxpilot_exe(), "schema", "list"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2 and "gate.dry_run" in done.stderr and "TUXPILOT_GATE_DRY_RUN" in done.stderr


def test_a_plugin_process_with_a_bad_folder_or_config_says_so_in_one_line(tmp_path: Path) -> None:
    # What the plugin host starts for each Python plugin; its failures are one line and exit 2.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    run = [sys.executable, "-m", "tuxpilot.sdk.process"]
    done = subprocess.run([*run, str(tmp_path)], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "plugin.toml" in done.stderr and len(done.stderr.strip().splitlines()) == 1

    env["TUXPILOT_STREAMS_MAX_DELIVER"] = "perhaps"
    done = subprocess.run([*run, str(tmp_path)], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2 and "streams.max_deliver" in done.stderr

    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr


def _called(up: Up, limit: float = 30) -> subprocess.CompletedProcess[str]:
    """`tuxpilot call` of sysmon.top_processes, retried until it answers or `limit` passes."""
    deadline = time.monotonic() + limit
    while True:
        done = up.cli("call", "up-host", "sysmon", "top_processes", '{"n": 1}')
        if done.returncode == 0 or time.monotonic() > deadline:
            return done
        time.sleep(0.3)


def _server(up: Up) -> psutil.Process:
    [server] = [p for p in up.tree() if p.name() == "nats-server"]
    return server


def test_a_killed_embedded_server_is_reaped_and_restarted_on_its_store_and_port(up: Up) -> None:
    assert _called(up).returncode == 0
    emitted = up.cli("event", "emit", "cpu.high", "--value", "97")
    assert emitted.returncode == 0, emitted.stderr
    before = _server(up)
    before.send_signal(signal.SIGKILL)

    deadline = time.monotonic() + 30
    while True:
        servers = [p for p in up.tree() if p.name() == "nats-server" and p.status() != psutil.STATUS_ZOMBIE]
        if servers and servers[0].pid != before.pid:
            break
        assert time.monotonic() < deadline, "the embedded server was not restarted"
        time.sleep(0.1)
    # Reaped: no <defunct> server left under the agent.
    assert not psutil.pid_exists(before.pid) or psutil.Process(before.pid).ppid() != up.proc.pid
    assert (up.state / "nats.url").read_text().strip() == up.url  # the same port

    # Actions and events flow again, and what was stored before the crash is still there (the same store).
    assert _called(up).returncode == 0
    emitted = up.cli("event", "emit", "memory.high", "--value", "97")
    assert emitted.returncode == 0, emitted.stderr
    event_id = json.loads(emitted.stdout)["id"]
    deadline = time.monotonic() + 30
    while True:
        audit = up.cli("audit", "--plugin", "sysmon", "--json")
        records = json.loads(audit.stdout) if audit.returncode == 0 else []
        # sysmon proposed for it and the gate decided (ok, or suppressed by the cooldown cpu.high started).
        if any(r.get("event_id") == event_id and r["status"] in ("ok", "suppressed") for r in records):
            break
        assert time.monotonic() < deadline, f"no result for the event after the restart: {records}"
        time.sleep(0.3)
    state = json.loads(up.cli("status", "--json").stdout)
    assert state["streams"]["tuxpilot_events"]["messages"] >= 2  # cpu.high from before the crash, memory.high


def test_a_second_up_on_the_same_state_dir_is_refused_and_leaves_the_first_alone(up: Up) -> None:
    second = subprocess.run([tuxpilot_exe(), "up"], capture_output=True, text=True, env=up.env, timeout=60)
    assert second.returncode == 2
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"state dir {up.state} is in use by another agent (pid {up.proc.pid}" in second.stderr
    assert "another state_dir" in second.stderr
    # The first one's URL file is still there, and the first one still serves.
    assert (up.state / "nats.url").read_text().strip() == up.url
    assert _called(up).returncode == 0
    assert up.proc.poll() is None


TEST_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


async def test_a_plugin_answering_discovery_in_another_plugins_name_is_not_counted(tmp_path: Path) -> None:
    """prober's own NATS user answers `$SRV.PING` as "sysmon" on this host, with sysmon's pid and user:
    `status` and `plugin list --live` still count one sysmon, and status names the impostor."""
    import nats.micro
    from tuxpilot.bus.connect import connect
    from tuxpilot.settings import NatsConfig

    up = Up(tmp_path / "state", TUXPILOT_RUN_PLUGINS=json.dumps(["sysmon", "prober"]),
            TUXPILOT_PLUGIN_DIRS=json.dumps([str(TEST_PLUGINS)]), TUXPILOT_CONFINEMENT_USER="root")
    try:
        assert (await asyncio.to_thread(_called, up)).returncode == 0

        def status() -> dict[str, Any]:
            shown = up.cli("status", "--json")
            assert shown.returncode == 0, shown.stderr
            doc: dict[str, Any] = json.loads(shown.stdout)
            return doc

        deadline = time.monotonic() + 30
        while True:
            state = await asyncio.to_thread(status)
            if {"sysmon", "prober"} <= {r["plugin"] for r in state["running"]}:
                break
            assert time.monotonic() < deadline, f"plugins never came up: {state['running']}"
            await asyncio.sleep(0.3)
        [real] = [r for r in state["running"] if r["plugin"] == "sysmon"]
        assert real["started_by_agent"] is True

        credential = up.state / "credentials" / "tuxpilot-up-host-plugin-prober.json"
        nc = await connect(NatsConfig(user_file=credential), up.url, name="spoofer")
        try:
            fake = await nats.micro.add_service(
                nc, name="sysmon", version="1.0.0", description="not sysmon", queue_group="sysmon",
                metadata={"tuxpilot": "plugin", "host": "up-host", "api_version": "1", "user": real["user"],
                          "pid": str(real["pid"])},
            )
            await nc.flush()
            state = await asyncio.to_thread(status)
            sysmons = [r for r in state["running"] if r["plugin"] == "sysmon"]
            assert [r["id"] for r in sysmons] == [real["id"]], sysmons
            [impostor] = state["impostors"]
            assert impostor["plugin"] == "sysmon" and impostor["id"] == fake.id
            listed = await asyncio.to_thread(up.cli, "plugin", "list", "--live", "--json")
            assert listed.returncode == 0, listed.stderr
            assert next(r for r in json.loads(listed.stdout) if r["name"] == "sysmon")["running"] == 1
            table = await asyncio.to_thread(up.cli, "status")
            assert f"impostor: an instance ({fake.id}) claims to be sysmon on up-host" in table.stdout
            await fake.stop()
        finally:
            await nc.close()
    finally:
        up.proc.terminate()
        up.proc.wait(30)


def test_a_broken_manifest_in_plugin_dirs_is_skipped_and_up_starts_the_others(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    (plugins / "broken").mkdir(parents=True)
    (plugins / "broken" / "plugin.toml").write_text("name = [this is not toml\n")
    up = Up(tmp_path / "state", TUXPILOT_PLUGIN_DIRS=json.dumps([str(plugins)]))
    try:
        assert _called(up).returncode == 0  # sysmon runs
    finally:
        up.proc.send_signal(signal.SIGTERM)
        _, err = up.proc.communicate(timeout=30)
    [line] = [line for line in err.splitlines() if "plugin.skipped" in line]
    assert str(plugins / "broken" / "plugin.toml") in line and "broken manifest" in line
    assert up.proc.returncode == 0
