"""Editing `run_plugins` while `tuxpilot up` runs starts and stops plugins, live: a real `up`, a real
config file, the plugins' real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import tuxpilot_exe

pytestmark = pytest.mark.slow

HELLO = Path(__file__).resolve().parent.parent / "plugins" / "hello"


class Up:
    def __init__(self, tmp: Path, conf: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
        self.env = {**env, "TUXPILOT_CONFIG": str(conf), "TUXPILOT_STATE_DIR": str(tmp / "state"),
                    "TUXPILOT_HOST_ID": "live-host"}
        self.log = (tmp / "up.log").open("w+")
        self.proc = subprocess.Popen([tuxpilot_exe(), "up", "--quiet"], stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=self.env, timeout=60)

    def running(self) -> dict[str, int]:
        done = self.cli("plugin", "list", "--live", "--json")
        return {p["name"]: p["running"] for p in json.loads(done.stdout)} if done.returncode == 0 else {}

    def processes(self) -> str:
        return " ".join(" ".join(p.cmdline()) for p in psutil.Process(self.proc.pid).children(recursive=True))

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()


def wait(what: str, check: Callable[[], bool], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Up, Path]]:
    shutil.copytree(HELLO, tmp_path / "plugins" / "hello")
    conf = tmp_path / "host.toml"
    conf.write_text(f'run_plugins = ["sysmon"]\nplugin_dirs = ["{tmp_path / "plugins"}"]\n')
    up = Up(tmp_path, conf)
    yield up, conf
    if up.proc.poll() is None:
        up.proc.send_signal(signal.SIGTERM)
        try:
            up.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.proc.kill()
            up.proc.wait()


def _set(conf: Path, plugins: list[str]) -> None:
    conf.write_text(re.sub(r"run_plugins = \[.*\]", f"run_plugins = {json.dumps(plugins)}", conf.read_text()))


def test_run_plugins_edits_start_and_stop_plugins_live(setup: tuple[Up, Path]) -> None:
    up, conf = setup
    wait("sysmon running", lambda: up.running().get("sysmon") == 1)

    _set(conf, ["sysmon", "hello"])
    wait("hello started", lambda: up.running().get("hello") == 1)
    called = up.cli("call", "live-host", "hello", "greet", '{"name": "live"}')
    assert called.returncode == 0, called.stderr + up.output()
    assert json.loads(called.stdout)["data"]["greeting"] == "hello, live"

    _set(conf, ["hello"])
    wait("sysmon stopped", lambda: up.running().get("sysmon") == 0 and "sysmon" not in up.processes())
    assert up.running().get("hello") == 1

    # A name that is not installed: said in the log, and nothing running is touched.
    _set(conf, ["hello", "nope"])
    wait("the refusal logged", lambda: "config.run_plugins_not_applied" in up.output())
    assert "no plugin named nope" in up.output()
    assert up.running().get("hello") == 1

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0
    assert "config.plugins_applied" in up.output()
