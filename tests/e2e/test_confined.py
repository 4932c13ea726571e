"""The whole pipeline with its plugin really confined: TuxPilot installed (from its wheel) into a venv the
unprivileged plugin user can run, `tuxpilot up` as root, the sysmon plugin under its own user `tuxpilot-p-sysmon`.

The development venv cannot show this: its Python lives under /root (mode 0700), so there plugins run
as root with a `plugin.unconfined` warning. Here the venv is made from the system's Python, in a
folder every user may pass through.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import need
from tests.test_docker import _engine

pytestmark = pytest.mark.slow

SYSMON_USER = "tuxpilot-p-sysmon"  # each plugin runs as a user of its own
DOCKER_USER = "tuxpilot-p-docker"
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


class Up:
    """`tuxpilot up` from the confined install, as root, on a state folder every user may pass through."""

    def __init__(self, bin_dir: Path, config: str):
        self.exe = str(bin_dir / "tuxpilot")
        self.state = open_dir("tuxpilot-confined-state-")
        self.config = self.state / "tuxpilot.toml"
        top = f'host_id = "{HOST}"\nstate_dir = "{self.state}"\n'
        self.config.write_text(f"{top}{config}\n[monitor]\nenabled = false\n")  # `config` may open tables
        self.config.chmod(0o600)  # the agent's: a plugin never reads it
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
        self.env["TUXPILOT_CONFIG"] = str(self.config)
        self.proc: subprocess.Popen[str] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.exe, *args], capture_output=True, text=True, env=self.env, cwd=self.state, timeout=60, check=False
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "up"], env=self.env, cwd=self.state, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "up on nats://" not in first:
            self.proc.kill()
            raise AssertionError(f"up did not start: {first!r} {self.proc.communicate()[1][-3000:]}")

    def instance(self, plugin: str) -> dict[str, str]:
        """The plugin's running instance, as `tuxpilot status` reports it."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            shown = self.cli("status", "--json")
            if shown.returncode == 0:
                running = [r for r in json.loads(shown.stdout)["running"] if r["plugin"] == plugin]
                if running:
                    return dict(running[0])
            time.sleep(0.3)
        raise AssertionError(f"{plugin} never came up")

    def stop(self) -> str:
        """Stop `up`; its log."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture
def up(installed: Path) -> Iterator[Callable[[str], Up]]:
    made: list[Up] = []

    def make(config: str = "") -> Up:
        made.append(Up(installed, config))
        return made[-1]

    yield make
    for host in made:
        if host.proc is not None and host.proc.poll() is None:
            host.stop()
        shutil.rmtree(host.state, ignore_errors=True)


def test_up_as_root_runs_the_plugin_as_the_plugin_user_end_to_end(up: Callable[[str], Up]) -> None:
    host = up("")
    host.start()
    # Who the sysmon instance is, as it reports itself and as the kernel sees it.
    instance = host.instance("sysmon")
    assert instance["user"] == SYSMON_USER
    process = psutil.Process(int(instance["pid"]))
    assert process.username() == SYSMON_USER
    assert process.uids().real == process.uids().effective != 0

    # It works under that user: its own credentials, the bus, an action over the gate's subjects.
    called = host.cli("call", HOST, "sysmon", "top_processes", '{"n": 3}')
    assert called.returncode == 0, called.stderr
    assert len(json.loads(called.stdout)["data"]["processes"]) == 3

    # What it may not do as that user: read the agent's credentials or the host config.
    agent_file = next(p for p in (host.state / "credentials").glob("*.json") if "agent" in p.name)
    for secret in (agent_file, host.config):
        probe = subprocess.run(
            ["/bin/cat", str(secret)], user=SYSMON_USER, capture_output=True, timeout=30, check=False
        )
        assert probe.returncode != 0 and b"Permission denied" in probe.stderr

    # A plugin installed from a package runs under its own user too, and cannot change its own code.
    from tuxpilot.pdk import keys, package

    publisher = keys.Signer.generate("acme")
    keys.TrustStore(host.state / "keys" / "trusted").trust(publisher.public)
    dist = open_dir("tuxpilot-confined-dist-")
    try:
        built = package.build(TEST_PLUGINS / "hello", dist, publisher)
        done = host.cli("plugin", "install", str(built))
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        shutil.rmtree(dist, ignore_errors=True)
    assert host.instance("hello")["user"] == "tuxpilot-p-hello"
    greeted = host.cli("call", HOST, "hello", "greet", "{}")
    assert greeted.returncode == 0, greeted.stdout + greeted.stderr
    code = host.state / "installed" / "hello" / "0.1.0" / "plugin.py"
    probe = subprocess.run(["/bin/sh", "-c", f"echo x >> {code}"], user="tuxpilot-p-hello", capture_output=True,
                           timeout=30, check=False)
    assert probe.returncode != 0 and b"Permission denied" in probe.stderr
    log = host.stop()
    assert "plugin.unconfined" not in log, log[-2000:]


def test_confined_docker_plugin_needs_the_docker_group_for_the_engine_socket(up: Callable[[str], Up]) -> None:
    _engine()  # a real engine, or skip (fail in CI)
    socket = Path(os.environ["DOCKER_HOST"].removeprefix("unix://"))
    need("engine socket of the docker group", grp.getgrgid(socket.stat().st_gid).gr_name == "docker",
         f"{socket} does not belong to the docker group")

    # Without the group: the socket is root:docker 0660, and the plugin's user is neither.
    host = up('run_plugins = ["docker"]\n')
    host.start()
    assert host.instance("docker")["user"] == DOCKER_USER
    denied = host.cli("call", HOST, "docker", "list_containers")
    assert denied.returncode == 1
    error = json.loads(denied.stdout)
    assert error["code"] == "forbidden" and "permission denied" in error["message"].lower(), error
    assert "[plugins.docker]" in error["message"]  # and what to do about it
    host.stop()

    # The operator names the group for this plugin: the same plugin reaches the engine.
    host = up('run_plugins = ["docker"]\n[plugins.docker]\ngroups = ["docker"]\n')
    host.start()
    assert host.instance("docker")["user"] == DOCKER_USER
    listed = host.cli("call", HOST, "docker", "list_containers")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert json.loads(listed.stdout)["status"] == "ok"


TEST_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def attack(host: Up, victim: dict[str, str], signal_number: int) -> dict[str, str]:
    """The prober plugin attacks the victim's process: ptrace, /proc/<pid>/mem, its credential file, a signal."""
    credential = host.state / "credentials" / f"tuxpilot-{HOST}-plugin-{victim['plugin']}.json"
    params = {"pid": int(victim["pid"]), "signal": signal_number, "read": str(credential)}
    done = host.cli("call", HOST, "prober", "attack", json.dumps(params))
    assert done.returncode == 0, done.stdout + done.stderr
    outcome: dict[str, str] = json.loads(done.stdout)["data"]
    return outcome


def test_each_plugin_runs_as_its_own_user_and_cannot_trace_signal_or_read_another(up: Callable[[str], Up]) -> None:
    host = up(f'run_plugins = ["sysmon", "prober"]\nplugin_dirs = ["{TEST_PLUGINS}"]\n')
    host.start()
    sysmon, prober = host.instance("sysmon"), host.instance("prober")
    assert (sysmon["user"], prober["user"]) == (SYSMON_USER, "tuxpilot-p-prober")
    assert psutil.Process(int(sysmon["pid"])).uids().real != psutil.Process(int(prober["pid"])).uids().real

    outcome = attack(host, sysmon, signal.SIGKILL)
    assert outcome["ptrace"] == "EPERM", outcome  # PTRACE_ATTACH refused
    assert outcome["mem"] in ("EACCES", "EPERM"), outcome  # /proc/<pid>/mem refused
    assert outcome["read"] == "EACCES", outcome  # its credential file
    assert outcome["kill"] == "EPERM", outcome  # SIGKILL refused
    # The victim is untouched: the same process, still answering.
    assert host.instance("sysmon")["pid"] == sysmon["pid"]
    called = host.cli("call", HOST, "sysmon", "top_processes", '{"n": 1}')
    assert called.returncode == 0, called.stderr
    host.stop()

    # The same attack between two plugins that share one user (as every plugin did before): it works,
    # so the test above measures the separate users, not something else in the way.
    shared = up(f'run_plugins = ["sysmon", "prober"]\nplugin_dirs = ["{TEST_PLUGINS}"]\n'
                '[confinement]\nuser = "tuxpilot-plugin"\n')
    shared.start()
    victim = shared.instance("sysmon")
    assert victim["user"] == shared.instance("prober")["user"] == "tuxpilot-plugin"
    outcome = attack(shared, victim, 0)  # signal 0: permission check only, the victim lives
    assert outcome["ptrace"] == "ok" and outcome["mem"].startswith("ok") and outcome["read"].startswith("ok"), outcome
    assert outcome["kill"] == "ok", outcome
