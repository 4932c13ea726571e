"""The whole pipeline with its plugin really confined: TuxPilot installed (from its wheel) into a venv the
unprivileged plugin user can run, `tuxpilot up` as root, the sysmon plugin under `tuxpilot-plugin`.

The development venv cannot show this: its Python lives under /root (mode 0700), so there plugins run
as root with a `plugin.unconfined` warning. Here the venv is made from the system's Python, in a
folder every user may pass through.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import need

pytestmark = pytest.mark.slow

PLUGIN_USER = "tuxpilot-plugin"
HOST = "confined-host"


def system_python() -> str | None:
    """A Python ≥ 3.11 outside /root, with venv, that any user may run."""
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.access(candidate, os.X_OK):
            continue
        done = subprocess.run(
            [candidate, "-c", "import sys, venv, ensurepip; print(sys.version_info >= (3, 11))"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if done.stdout.strip() == "True":
            return candidate
    return None


def open_dir(prefix: str) -> Path:
    """A temp folder every user may pass through (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Iterator[Path]:
    """A venv of the system's Python with the wheel installed; its bin folder."""
    need("root", os.geteuid() == 0, "running plugins as another user needs the agent to run as root")
    python = system_python()
    need("system Python 3.11", python is not None, "no Python >= 3.11 with venv outside /root (Debian: python3-venv)")
    assert python is not None
    root = open_dir("tuxpilot-confined-venv-")
    try:
        subprocess.run([python, "-m", "venv", str(root)], check=True, capture_output=True, timeout=300)
        done = subprocess.run(
            [str(root / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
            capture_output=True, text=True, timeout=900, check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        yield root / "bin"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_up_as_root_runs_the_plugin_as_the_plugin_user_end_to_end(installed: Path) -> None:
    state = open_dir("tuxpilot-confined-state-")
    config = state / "tuxpilot.toml"
    config.write_text(f'host_id = "{HOST}"\nstate_dir = "{state}"\n[monitor]\nenabled = false\n')
    config.chmod(0o600)  # the agent's: a plugin never reads it
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    env["TUXPILOT_CONFIG"] = str(config)
    exe = str(installed / "tuxpilot")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=state, timeout=60, check=False)

    up = subprocess.Popen([exe, "up"], env=env, cwd=state, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        assert "up on nats://" in up.stdout.readline()

        # Who the sysmon instance is, as it reports itself and as the kernel sees it.
        deadline, instance = time.monotonic() + 60, None
        while instance is None and time.monotonic() < deadline:
            state_now = cli("status", "--json")
            if state_now.returncode == 0:
                running = [r for r in json.loads(state_now.stdout)["running"] if r["plugin"] == "sysmon"]
                instance = running[0] if running else None
            if instance is None:
                time.sleep(0.3)
        assert instance is not None, "sysmon never came up confined"
        assert instance["user"] == PLUGIN_USER
        process = psutil.Process(int(instance["pid"]))
        assert process.username() == PLUGIN_USER
        assert process.uids().real == process.uids().effective != 0

        # It works under that user: its own credentials, the bus, an action over the gate's subjects.
        called = cli("call", HOST, "sysmon", "top_processes", '{"n": 3}')
        assert called.returncode == 0, called.stderr
        assert len(json.loads(called.stdout)["data"]["processes"]) == 3

        # What it may not do as that user: read the agent's credentials or the host config.
        creds = state / "credentials"
        agent_file = next(p for p in creds.glob("*.json") if "agent" in p.name)
        for secret in (agent_file, config):
            probe = subprocess.run(
                ["/bin/cat", str(secret)], user=PLUGIN_USER, capture_output=True, timeout=30, check=False
            )
            assert probe.returncode != 0 and b"Permission denied" in probe.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            _, err = up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            _, err = up.communicate()
        shutil.rmtree(state, ignore_errors=True)
    assert "plugin.unconfined" not in err, err[-2000:]
