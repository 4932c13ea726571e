"""Confined plugin processes, for real: the unprivileged user, rlimits in /proc, reachability, the
parent-death signal across the user switch, crash loops reported on the bus."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.aio.client import Client
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import Config, load_config
from tuxpilot.bus import auth
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.manifest import Limits
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects
from tuxpilot.runtimes.confine import Account, effective_limits, find_account, may, probe_python, unreachable
from tuxpilot.runtimes.host import PluginHost
from tuxpilot.runtimes.settings import ConfinementConfig

from tests.conftest import need, tuxpilot_exe, until

TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
HOST = "test-host"
IS_ROOT = os.geteuid() == 0
PLUGIN_USER = "tuxpilot-p-whoami"  # each plugin runs as a user of its own


def need_root() -> None:
    need("root", IS_ROOT, "running plugins as another user needs the agent to run as root")


@pytest.fixture
def open_state() -> Iterator[Path]:
    """A state dir an unprivileged user can reach: pytest's tmp_path lies under a 0700 directory."""
    state = Path(tempfile.mkdtemp(prefix="tuxpilot-confine-"))
    state.chmod(0o755)
    yield state
    shutil.rmtree(state, ignore_errors=True)


def host_config(state: Path, url: str = "nats://127.0.0.1:1", **env: str) -> Config:
    return load_config(
        environ={
            "TUXPILOT_NATS_URL": url,
            "TUXPILOT_HOST_ID": HOST,
            "TUXPILOT_STATE_DIR": str(state),
            "TUXPILOT_PLUGIN_DIRS": json.dumps([str(TEST_PLUGINS)]),
            "TUXPILOT_MONITOR_ENABLED": "false",
            **env,
        }
    )


class Whoami:
    """The native `whoami` plugin under a real PluginHost, with a credential file as `auth` writes it;
    the events the host reports are collected."""

    def __init__(self, state: Path, **env: str):
        self.config = host_config(state, **env)
        manifest = load_manifest(TEST_PLUGINS / "whoami")
        users = auth.users_for(Subjects.of(self.config), {"whoami": manifest})
        auth.provision(self.config.state_dir, users)
        self.reported: list[Event] = []
        self.host = PluginHost(
            self.config, "nats://127.0.0.1:1", {"whoami": (TEST_PLUGINS / "whoami", manifest)}, report=self.report
        )
        self.host.credentials = {"whoami": auth.credential_file(self.config.state_dir, users[-1].name)}

    async def report(self, event: Event) -> None:
        self.reported.append(event)


@pytest.fixture
async def whoami() -> AsyncIterator[Any]:
    """Start `whoami` with a state dir and config env of the test's choosing; stopped afterwards."""
    started: list[Whoami] = []

    async def start(state: Path, **env: str) -> Whoami:
        rig = Whoami(state, **env)
        started.append(rig)
        await rig.host.start()
        return rig

    yield start
    for rig in started:
        await rig.host.stop()


async def sleeping(host: PluginHost, name: str = "whoami") -> psutil.Process:
    """The plugin's process once its script has exec'd into `sleep`."""
    plugin = host.plugins[name]

    def ready() -> bool:
        try:
            return plugin.pid is not None and psutil.Process(plugin.pid).name() == "sleep"
        except psutil.NoSuchProcess:
            return False

    await until(ready, 20, f"{name} to start")
    assert plugin.pid is not None
    return psutil.Process(plugin.pid)


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits as {name: (soft, hard)}."""
    found = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        found[name] = (soft, hard)
    return found


# -- pure parts ----------------------------------------------------------------------------------


def test_limits_come_from_the_manifest_within_the_host_maxima() -> None:
    cfg = ConfinementConfig(
        default_limits=Limits(memory_mb=512, open_files=256),
        max_limits=Limits(memory_mb=1024, cpu_s=600, processes=100),
    )
    limits, cut = effective_limits(Limits(memory_mb=4096, cpu_s=60, open_files=64), cfg)
    assert limits == {"memory_mb": 1024, "cpu_s": 60, "open_files": 64, "processes": 100}
    assert cut == {"memory_mb": (4096, 1024)}
    # No limits in the manifest: the host's defaults, and a maximum still caps what has no default.
    assert effective_limits(None, cfg) == ({"memory_mb": 512, "cpu_s": 600, "open_files": 256, "processes": 100}, {})


def test_reachability_names_the_directory_that_stops_the_user(open_state: Path) -> None:
    stranger = Account("stranger", 54321, 54321, (54321,))
    closed = open_state / "closed"
    (closed / "inner").mkdir(parents=True)
    target = closed / "inner" / "file"
    target.write_text("x")
    target.chmod(0o644)
    closed.chmod(0o700)
    reason = unreachable(target, stranger, os.R_OK)
    assert reason is not None
    assert str(closed) in reason and "0700" in reason and "stranger cannot pass through it" in reason
    closed.chmod(0o711)
    assert unreachable(target, stranger, os.R_OK) is None
    target.chmod(0o600)
    reason = unreachable(target, stranger, os.R_OK)
    assert reason is not None and "0600" in reason and "stranger cannot read it" in reason
    st = target.stat()
    assert may(st, Account("owner", st.st_uid, st.st_gid, (st.st_gid,)), os.R_OK | os.W_OK)
    target.chmod(0o640)
    assert may(target.stat(), Account("member", 54321, 1, (54321, st.st_gid)), os.R_OK)
    assert not may(target.stat(), stranger, os.R_OK)


async def test_the_interpreter_probe_asks_the_kernel() -> None:
    me = pwd.getpwuid(os.geteuid())
    account, _ = find_account(me.pw_name)
    assert account is not None
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "HOME")}
    assert await probe_python(sys.executable, account, env) is None
    reason = await probe_python("/nonexistent/python3", account, env)
    assert reason is not None and "cannot run /nonexistent/python3" in reason


def test_a_plugin_gets_its_own_settings_from_the_host_and_no_agent_secret(open_state: Path) -> None:
    config = host_config(
        open_state,
        TUXPILOT_NATS_PASSWORD="agent-secret",
        TUXPILOT_STREAMS_ACK_WAIT_S="7",
        TUXPILOT_PLUGINS=json.dumps({"hog": {"config": {"crashes": 9}}, "other": {"config": {"key": "theirs"}}}),
    )
    manifest = load_manifest(TEST_PLUGINS / "hog")
    host = PluginHost(config, "nats://127.0.0.1:4222", {"hog": (TEST_PLUGINS / "hog", manifest)})
    env = host.environment(host.plugins["hog"])
    assert "agent-secret" not in json.dumps(env)
    assert env["TUXPILOT_CONFIG"] == os.devnull  # no config file: it could hold the agent's credentials
    seen = load_config(environ=env)  # what the plugin process will load
    assert seen.plugin("hog").config == {"crashes": 9}
    assert "other" not in seen.plugins
    assert seen.streams.ack_wait_s == 7
    assert seen.nats.url == "nats://127.0.0.1:4222"
    assert seen.nats.password is None


# -- real processes ------------------------------------------------------------------------------


async def test_rlimits_are_set_in_the_plugin_process(whoami: Any, open_state: Path) -> None:
    rig = await whoami(open_state, TUXPILOT_CONFINEMENT_MAX_LIMITS_OPEN_FILES="32")
    proc = await sleeping(rig.host)
    limits = proc_limits(proc.pid)
    assert limits["Max address space"] == (str(64 * 1024 * 1024),) * 2
    assert limits["Max cpu time"] == ("100", "100")
    assert limits["Max open files"] == ("32", "32")  # the manifest asked 64; the host allows 32
    assert limits["Max processes"] == ("50", "50")


async def test_as_root_the_plugin_runs_as_the_unprivileged_user(whoami: Any, open_state: Path) -> None:
    need_root()
    rig = await whoami(open_state)
    proc = await sleeping(rig.host)
    account, _ = find_account(PLUGIN_USER)
    assert account is not None, f"the host did not create {PLUGIN_USER}"
    assert proc.uids().real == proc.uids().effective == account.uid
    assert proc.gids().real == account.gid
    workdir = rig.host.workdir(rig.host.plugins["whoami"])
    await until(lambda: (workdir / "credentials").exists(), 10, "the script's records")
    assert (workdir / "uid").read_text().strip() == str(account.uid)
    assert (workdir / "groups").read_text().split() == [str(account.gid)]  # none of root's groups
    # Its credential file is handed over (and only it): the plugin can read it, 0600, its own.
    credential = rig.host.credentials["whoami"]
    assert (workdir / "credentials").read_text().strip() == "yes"
    assert credential.stat().st_uid == account.uid
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600
    assert stat.S_IMODE(credential.parent.stat().st_mode) == 0o711
    agent_file = credential.parent / f"tuxpilot-{HOST}-agent.json"
    assert agent_file.stat().st_uid == 0 and stat.S_IMODE(agent_file.stat().st_mode) == 0o600
    assert workdir.stat().st_uid == account.uid
    assert rig.reported == []  # confined: nothing to warn about


async def test_a_plugin_gets_the_supplementary_groups_its_host_config_names(whoami: Any, open_state: Path) -> None:
    need_root()
    extra = next(g for g in grp.getgrall() if g.gr_gid != 0 and g.gr_name != PLUGIN_USER)
    groups = [extra.gr_name, "no-such-group-here"]  # a missing one is logged and left out
    rig = await whoami(open_state, TUXPILOT_PLUGINS=json.dumps({"whoami": {"groups": groups}}))
    await sleeping(rig.host)
    account, _ = find_account(PLUGIN_USER)
    assert account is not None
    workdir = rig.host.workdir(rig.host.plugins["whoami"])
    await until(lambda: (workdir / "credentials").exists(), 10, "the script's records")
    assert {int(g) for g in (workdir / "groups").read_text().split()} == {account.gid, extra.gr_gid}


async def test_unreachable_state_dir_runs_the_plugin_as_root_with_a_warning(whoami: Any, open_state: Path) -> None:
    need_root()
    closed = open_state / "closed"
    closed.mkdir(mode=0o700)
    rig = await whoami(closed / "state")
    proc = await sleeping(rig.host)
    assert proc.uids().real == 0
    [warning] = rig.reported
    assert warning.type == "plugin.unconfined" and warning.severity == "warning"
    assert warning.resource == "whoami" and warning.data["user"] == "root"
    assert str(closed) in warning.data["reason"] and "0700" in warning.data["reason"]
    assert "chmod o+x" in warning.data["fix"] and "confinement.strict" in warning.data["fix"]


async def test_strict_refuses_a_plugin_that_cannot_be_confined(whoami: Any, open_state: Path) -> None:
    need_root()
    closed = open_state / "closed"
    closed.mkdir(mode=0o700)
    rig = await whoami(closed / "state", TUXPILOT_CONFINEMENT_STRICT="true")
    await until(lambda: bool(rig.reported), 20, "the refusal")
    [refusal] = rig.reported
    assert refusal.type == "plugin.refused" and refusal.severity == "critical"
    assert str(closed) in refusal.data["reason"]
    await asyncio.sleep(0.3)
    assert rig.host.plugins["whoami"].pid is None, "a refused plugin was started"


def test_a_killed_agent_takes_its_confined_plugin_with_it(nats_server: NatsServer, open_state: Path) -> None:
    """The parent-death signal is armed after the switch to the plugin user (a credential change
    clears it), so SIGKILLing a root agent still ends its unprivileged plugins."""
    need_root()
    env = {
        **os.environ,
        "TUXPILOT_NATS_URL": nats_server.url,
        "TUXPILOT_HOST_ID": HOST,
        "TUXPILOT_STATE_DIR": str(open_state),
        "TUXPILOT_PLUGIN_DIRS": json.dumps([str(TEST_PLUGINS)]),
        "TUXPILOT_RUN_PLUGINS": json.dumps(["whoami"]),
        "TUXPILOT_MONITOR_ENABLED": "false",
        "TUXPILOT_LOG_LEVEL": "warning",
    }
    agent = subprocess.Popen([tuxpilot_exe(), "agent"], env=env, stdin=subprocess.DEVNULL)
    plugin: psutil.Process | None = None
    try:
        deadline = time.monotonic() + 30
        while not (found := [p for p in psutil.Process(agent.pid).children() if p.name() == "sleep"]):
            assert agent.poll() is None, "the agent died"
            assert time.monotonic() < deadline, "the plugin never started"
            time.sleep(0.1)
        [plugin] = found
        assert pwd.getpwuid(plugin.uids().real).pw_name == PLUGIN_USER
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        _, alive = psutil.wait_procs([plugin], timeout=10)
        assert not alive, f"the plugin outlived the agent: {alive}"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if plugin is not None and plugin.is_running():
            plugin.kill()


@pytest.mark.slow
async def test_a_plugin_past_its_memory_limit_crash_loops_and_the_loop_is_reported(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    # The interpreter here may be out of an unprivileged user's reach (/root is 0700): run as root.
    config = host_config(
        tmp_path / "state",
        url=nats_server.url,
        TUXPILOT_RUN_PLUGINS=json.dumps(["hog"]),
        TUXPILOT_CONFINEMENT_USER="root",
        TUXPILOT_SUPERVISION_BACKOFF_START_S="0.1",
        TUXPILOT_SUPERVISION_CRASH_LOOP_RESTARTS="3",
        TUXPILOT_SUPERVISION_CRASH_LOOP_WINDOW_S="60",
        TUXPILOT_SUPERVISION_HEALTHY_AFTER_S="4",
    )
    events: list[dict[str, Any]] = []

    async def on_event(msg: Any) -> None:
        events.append(json.loads(msg.data))

    await nc.subscribe(f"tuxpilot.evt.{HOST}.plugin.*", cb=on_event)
    await nc.flush()
    agent = Agent(config, embedded=False)
    await agent.start()
    try:
        await until(lambda: any(e["type"] == "plugin.crash_loop" for e in events), 40, "plugin.crash_loop")
        loop = next(e for e in events if e["type"] == "plugin.crash_loop")
        assert loop["severity"] == "critical" and loop["resource"] == "hog" and loop["source"] == "agent"
        data = loop["data"]
        assert data["restarts"] == 3 and data["window_s"] == 60
        assert data["exit_code"] == 1  # an uncaught MemoryError
        assert data["next_backoff_s"] == pytest.approx(0.4)  # 0.1, 0.2, 0.4: backing off
        assert data["limits"]["memory_mb"] == 256
        workdir = config.state_dir / "plugins" / "hog"
        assert int((workdir / "limit").read_text()) == 256 * 1024 * 1024  # RLIMIT_AS, as the plugin saw it
        # The fourth start behaves; once it has stayed up, the loop is over.
        await until(lambda: any(e["type"] == "plugin.recovered" for e in events), 30, "plugin.recovered")
        recovered = next(e for e in events if e["type"] == "plugin.recovered")
        assert recovered["resource"] == "hog" and recovered["severity"] == "info"
        assert int((workdir / "starts").read_text()) == 4
        reply = await nc.request(f"tuxpilot.exec.{HOST}.hog.ping", b"{}", timeout=5)
        assert json.loads(reply.data)["data"] == {"pong": "hog"}
        assert [e["type"] for e in events].count("plugin.crash_loop") == 1
    finally:
        await agent.stop()
