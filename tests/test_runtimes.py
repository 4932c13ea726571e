"""Runtimes and plugin loading: how each manifest runtime starts and maps limits, what this host cannot
run (refused when loaded, one line naming the runtime and what is missing), broken manifests, shadowed
names and entry points that leave the plugin folder; then a real agent with such plugins."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from tuxpilot.agent.app import Agent, select_plugins
from tuxpilot.agent.config import Config, edit_grants, load_config
from tuxpilot.agent.status import snapshot
from tuxpilot.bus.connect import connect
from tuxpilot.bus.plugin_state import read_states
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import Permission, builtin_dir, load
from tuxpilot.protocol.names import Subjects
from tuxpilot.runtimes.catalog import RUNTIMES
from tuxpilot.runtimes.host import PluginHost
from tuxpilot.runtimes.loader import installed
from tuxpilot.runtimes.settings import own_user

from tests.conftest import need, tuxpilot_exe
from tests.test_confine import proc_limits

HOST = "test-host"
NO_NODE = "/nonexistent-bin"


def make_plugin(base: Path, name: str, runtime: str = "native", entry: str = "run.sh",
                script: str = "#!/bin/sh\nexec sleep 600\n", extra: str = "", folder: str | None = None) -> Path:
    """A plugin folder with a manifest and, unless the entry point leaves the folder, its program."""
    where = base / (folder or name)
    where.mkdir(parents=True)
    (where / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "1.0.0"\ndescription = "test"\ncategory = "development"\n'
        f'runtime = "{runtime}"\nentry_point = "{entry}"\napi_version = "1"\n{extra}'
    )
    program = where / entry
    if program.resolve().is_relative_to(where.resolve()) and not program.exists():
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text(script)
        program.chmod(0o755)
    return where


def host_config(plugin_dirs: list[Path], run: list[str], url: str = "nats://127.0.0.1:1", **env: str) -> Config:
    return load_config(environ={
        "TUXPILOT_NATS_URL": url,
        "TUXPILOT_HOST_ID": HOST,
        "TUXPILOT_STATE_DIR": str(plugin_dirs[0].parent / "state"),
        "TUXPILOT_PLUGIN_DIRS": json.dumps([str(d) for d in plugin_dirs]),
        "TUXPILOT_RUN_PLUGINS": json.dumps(run),
        "TUXPILOT_MONITOR_ENABLED": "false",
        **env,
    })


# -- each runtime ----------------------------------------------------------------------------------


def test_each_runtime_says_how_it_starts_and_how_its_limits_map(tmp_path: Path) -> None:
    limits = {"memory_mb": 256, "cpu_s": 60, "open_files": 64}
    py = load(make_plugin(tmp_path, "py", "python", "plugin.py", "print()\n"))
    launch = RUNTIMES["python"].launch(tmp_path / "py", py, limits, os.defpath)
    assert launch.argv == [sys.executable, "-m", "tuxpilot.sdk.process", str(tmp_path / "py")]
    assert launch.rlimits == limits and launch.env == {"MALLOC_ARENA_MAX": "2"}

    js = load(make_plugin(tmp_path, "js", "javascript", "main.js", "process.exit(0)\n"))
    launch = RUNTIMES["javascript"].launch(tmp_path / "js", js, limits, "/usr/local/bin:/usr/bin:/bin")
    # V8 cannot start under a small RLIMIT_AS: memory_mb is its heap limit, and the address space gets
    # headroom on top (tests/test_javascript.py shows both).
    assert launch.argv[1:] == ["--max-old-space-size=256", str(tmp_path / "js" / "main.js")]
    assert Path(launch.argv[0]).name == "node"
    assert launch.rlimits == {"memory_mb": 256 + 1024, "cpu_s": 60, "open_files": 64}
    assert json.loads(launch.env["TUXPILOT_MANIFEST"])["name"] == "js"

    native = load(make_plugin(tmp_path, "bin"))
    launch = RUNTIMES["native"].launch(tmp_path / "bin", native, limits, os.defpath)
    assert launch.argv == [str(tmp_path / "bin" / "run.sh")] and launch.rlimits == limits


def test_a_runtime_this_host_cannot_run_is_named_with_what_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "plugins"
    make_plugin(base, "web", "javascript", "main.js", "process.exit(0)\n")
    make_plugin(base, "tiny", "wasm", "plugin.wasm", "\0asm")
    make_plugin(base, "boxed", "container", "image.tar", "", extra='image = "tuxpilot-boxed:1"\n')
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    make_plugin(base, "noexec", script="#!/bin/sh\n")
    (base / "noexec" / "run.sh").chmod(0o644)
    make_plugin(base, "fine")
    config = host_config([base], [])
    found = installed([base], builtin_dir(), config, path=NO_NODE).plugins
    assert found["web"].problem == (
        f"runtime javascript cannot run here: node is not on PATH ({NO_NODE}): install Node.js or add its "
        "directory to PATH"
    )
    assert found["tiny"].problem == (f"runtime wasm cannot run here: its entry point {base}/tiny/plugin.wasm is not a "
                                     "valid WebAssembly module: unexpected end-of-file (at offset 0x4)")
    assert found["boxed"].problem == ("runtime container cannot run here: no Docker engine answers at "
                                      "unix:///nonexistent/docker.sock (DockerException)")
    assert found["noexec"].problem is not None and "is not executable" in found["noexec"].problem
    assert found["fine"].runnable
    # With node on the PATH the JavaScript plugin is runnable.
    node_dir = os.path.dirname(sys.executable)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "node").symlink_to("/bin/true")
    assert installed([base], builtin_dir(), config, path=f"{tmp_path / 'bin'}:{node_dir}").plugins["web"].runnable


# -- loading plugin folders -----------------------------------------------------------------------


def test_a_broken_manifest_is_skipped_with_its_error_and_the_others_load(tmp_path: Path) -> None:
    base = tmp_path / "plugins"
    make_plugin(base, "good")
    broken = base / "broken"
    broken.mkdir()
    (broken / "plugin.toml").write_text('name = "broken"\nversion = [unclosed\n')
    invalid = make_plugin(base, "invalid", extra='permissions = ["root_please"]\n')
    found = installed([base], builtin_dir(), host_config([base], []))
    assert "good" in found.plugins and "sysmon" in found.plugins  # and the built-ins
    skipped = {f.name: f.problem for f in found.skipped}
    assert set(skipped) == {"broken", "invalid"}
    assert skipped["broken"] is not None and str(broken / "plugin.toml") in skipped["broken"]
    assert skipped["invalid"] is not None and str(invalid / "plugin.toml") in skipped["invalid"]

    # Named in run_plugins, it is refused with that error; the others still run.
    selected = select_plugins(host_config([base], ["good", "broken", "sysmon"]))
    assert sorted(selected.run) == ["good", "sysmon"]
    assert selected.refused["broken"].problem == skipped["broken"]
    # A name found nowhere at all is still a mistake in the config.
    with pytest.raises(ConfigError, match="run_plugins: no plugin named nothere"):
        select_plugins(host_config([base], ["good", "nothere"]))


def test_a_folder_named_like_a_builtin_is_refused_unless_the_host_config_picks_it(tmp_path: Path) -> None:
    base = tmp_path / "plugins"
    shadow = make_plugin(base, "sysmon", extra='permissions = ["system_access"]\n')
    config = host_config([base], ["sysmon"])
    found = installed([base], builtin_dir(), config)
    assert found.plugins["sysmon"].folder == builtin_dir() / "sysmon"  # the built-in still runs
    [refused] = found.skipped
    assert refused.folder == shadow and refused.problem is not None
    assert "another folder holds a plugin named 'sysmon'" in refused.problem
    assert "set plugins.sysmon.folder" in refused.problem

    picked = host_config([base], ["sysmon"], TUXPILOT_PLUGINS=json.dumps({"sysmon": {"folder": str(shadow)}}))
    found = installed([base], builtin_dir(), picked)
    assert found.plugins["sysmon"].folder == shadow
    assert [f.folder for f in found.skipped] == [builtin_dir() / "sysmon"]

    # Two folders of one name in plugin_dirs, neither built-in and none picked: neither runs.
    other = tmp_path / "more"
    make_plugin(base, "twin")
    make_plugin(other, "twin")
    both = host_config([base, other], ["twin"])
    assert "twin" not in installed([base, other], builtin_dir(), both).plugins
    assert select_plugins(both).refused["twin"].problem is not None


def test_an_entry_point_outside_the_plugin_folder_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "plugins"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.sh").write_text("#!/bin/sh\n")
    escapes = {
        "dotdot": "../../outside/evil.sh",
        "absolute": str(outside / "evil.sh"),
        "itself": ".",
    }
    for name, entry in escapes.items():
        make_plugin(base, name, entry=entry)
    linked = make_plugin(base, "linked", entry="run.sh", script="")
    (linked / "run.sh").unlink()
    (linked / "run.sh").symlink_to(outside / "evil.sh")  # resolved: outside
    inside = make_plugin(base, "inside", entry="bin/run.sh", folder="inside")  # a subfolder is fine
    assert inside.exists()
    for name in [*escapes, "linked"]:
        with pytest.raises(ConfigError, match="leads outside the plugin folder"):
            load(base / name)
    assert load(base / "inside").entry_point == "bin/run.sh"
    skipped = {f.name for f in installed([base], builtin_dir(), host_config([base], [])).skipped}
    assert skipped == {*escapes, "linked"}


def test_each_plugin_user_name_fits_useradd() -> None:
    assert own_user("tuxpilot-p-", "sysmon") == "tuxpilot-p-sysmon"
    long = own_user("tuxpilot-p-", "a-plugin-with-a-very-long-name-indeed")
    assert len(long) <= 32 and long.startswith("tuxpilot-p-a-plugin")
    assert long != own_user("tuxpilot-p-", "a-plugin-with-a-very-long-name-indeed-2")


# -- the CLI and a real agent ---------------------------------------------------------------------


def test_plugin_list_shows_what_this_host_cannot_run_and_why(tmp_path: Path) -> None:
    base = tmp_path / "plugins"
    make_plugin(base, "web", "javascript", "main.js", "")
    make_plugin(base, "sysmon")  # shadows the built-in
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")},
        "PATH": NO_NODE,
        "COLUMNS": "400",  # one table row per line
        "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
        "TUXPILOT_PLUGIN_DIRS": json.dumps([str(base)]),
    }
    done = subprocess.run([tuxpilot_exe(), "plugin", "list", "--json"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    web = next(r for r in rows if r["name"] == "web")
    assert web["runnable"] is False and "node is not on PATH" in web["problem"]
    sysmons = [r for r in rows if r["name"] == "sysmon"]
    assert sorted(r["runnable"] for r in sysmons) == [False, True]
    table = subprocess.run([tuxpilot_exe(), "plugin", "list"], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
    assert "node is not on PATH" in table.stdout


def test_plugin_grant_keeps_the_host_config_private(tmp_path: Path) -> None:
    # Created by a grant (as `plugin grant` does when no config file exists yet): private.
    config = tmp_path / "etc" / "tuxpilot.toml"
    sysmon = load(builtin_dir() / "sysmon")
    edit_grants(config, sysmon, frozenset(), add=[Permission.filesystem_read], remove=[])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # An existing file made world-readable by hand: `plugin grant` takes the others' bits away.
    config.chmod(0o644)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")},
           "TUXPILOT_STATE_DIR": str(tmp_path / "state")}
    cli = [tuxpilot_exe(), "--config", str(config), "plugin"]
    done = subprocess.run([*cli, "revoke", "sysmon", "filesystem_read"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o640  # others lose read; the group keeps it
    config.chmod(0o600)
    done = subprocess.run([*cli, "grant", "sysmon", "filesystem_read"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "filesystem_read" in config.read_text()


async def test_an_agent_refuses_what_it_cannot_run_and_status_shows_why_and_the_crash_loop(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    base = tmp_path / "plugins"
    make_plugin(base, "fine")
    make_plugin(base, "tiny", "wasm", "plugin.wasm", "\0asm")
    make_plugin(base, "crashy", script="#!/bin/sh\nexit 3\n")
    broken = base / "broken"
    broken.mkdir()
    (broken / "plugin.toml").write_text("this is not toml\n")
    config = host_config(
        [base], ["fine", "tiny", "crashy", "broken"], url=nats_server.url,
        TUXPILOT_CONFINEMENT_USER="root",  # the temp dir is out of other users' reach
        TUXPILOT_SUPERVISION_BACKOFF_START_S="0.05",
        TUXPILOT_SUPERVISION_CRASH_LOOP_RESTARTS="3",
    )
    nc = await connect(config.nats, nats_server.url, name="test")
    states: dict[str, Any] = {}
    try:
        async with Agent(config, embedded=False) as agent:
            assert agent.host is not None and sorted(agent.host.plugins) == ["crashy", "fine"]

            async def refresh() -> None:
                found = await read_states(nc.jetstream(), Subjects.of(config))
                states.update({k: s.to_doc() for k, s in found.items()})

            async def looping() -> bool:
                await refresh()
                return states.get(f"{HOST}.crashy", {}).get("state") == "crash_loop"

            for _ in range(300):
                if await looping():
                    break
                await asyncio.sleep(0.1)
            crashy = states[f"{HOST}.crashy"]
            assert crashy["state"] == "crash_loop" and crashy["last_exit"]["exit_code"] == 3, crashy
            assert states[f"{HOST}.tiny"]["state"] == "not_runnable"
            assert states[f"{HOST}.tiny"]["reason"] == (
                f"runtime wasm cannot run here: its entry point {base}/tiny/plugin.wasm is not a valid WebAssembly "
                "module: unexpected end-of-file (at offset 0x4)")
            assert "broken manifest" in states[f"{HOST}.broken"]["reason"]
            assert states[f"{HOST}.fine"]["state"] == "running" and states[f"{HOST}.fine"]["pid"]

            shown = await snapshot(nc, Subjects.of(config))
            assert shown["plugin_states"][f"{HOST}.tiny"]["state"] == "not_runnable"
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")},
                   "COLUMNS": "400", "TUXPILOT_NATS_URL": nats_server.url, "TUXPILOT_HOST_ID": HOST,
                   "TUXPILOT_STATE_DIR": str(tmp_path / "cli-state")}
            table = await asyncio.to_thread(subprocess.run, [tuxpilot_exe(), "status"], capture_output=True,
                                            text=True, env=env, timeout=60, check=False)
            assert table.returncode == 0, table.stderr
            assert "not runnable: runtime wasm cannot run here" in table.stdout
            assert "crash loop" in table.stdout and "last exit: code 3" in table.stdout
        await refresh()
        assert states[f"{HOST}.fine"]["state"] == "stopped"
    finally:
        await nc.close()


async def test_a_javascript_plugin_gets_its_memory_limit_as_v8s_heap_not_as_address_space(tmp_path: Path) -> None:
    """node does not even start under a 64 MiB RLIMIT_AS; with the limit as --max-old-space-size it runs,
    and V8 reports a heap limit of that order; the address space is capped with V8's headroom on top."""
    need("node", shutil.which("node") is not None, "node is not on PATH")
    base = tmp_path / "plugins"
    script = (
        "const fs = require('fs'); const v8 = require('v8');\n"
        "fs.writeFileSync('heap', JSON.stringify({limit: v8.getHeapStatistics().heap_size_limit,"
        " argv: process.execArgv}));\n"
        "setInterval(() => {}, 1000);\n"
    )
    folder = make_plugin(base, "jsheap", "javascript", "main.js", script, extra="[limits]\nmemory_mb = 64\n")
    config = host_config([base], ["jsheap"], TUXPILOT_CONFINEMENT_USER="root")
    host = PluginHost(config, "nats://127.0.0.1:1", {"jsheap": (folder, load(folder))})
    await host.start()
    try:
        record = config.state_dir / "plugins" / "jsheap" / "heap"
        for _ in range(200):
            if record.exists() and record.read_text():
                break
            await asyncio.sleep(0.05)
        doc = json.loads(record.read_text())
        assert doc["argv"] == ["--max-old-space-size=64"]
        assert 64 * 1024 * 1024 <= doc["limit"] < 256 * 1024 * 1024  # old space 64 MiB plus the young space
        pid = host.plugins["jsheap"].pid
        assert pid is not None
        cap = str((64 + 1024) * 1024 * 1024)  # javascript.ADDRESS_HEADROOM_MB over the heap limit
        assert proc_limits(pid)["Max address space"] == (cap, cap)
    finally:
        await host.stop()


async def test_as_root_a_javascript_plugin_runs_as_its_own_user_once_node_is_probed_for_it() -> None:
    """The host asks the kernel whether the plugin's user can run node (`node --version` as that user)
    before it drops to it; then the plugin runs as `tuxpilot-p-<name>`."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it creates the plugin's user")
    need("node", shutil.which("node") is not None, "node is not on PATH")
    root = Path(tempfile.mkdtemp(prefix="tuxpilot-js-"))
    os.chmod(root, 0o755)  # mkdtemp makes it 0700: the plugin user must pass through
    try:
        base = root / "plugins"
        script = "require('fs').writeFileSync('uid', String(process.getuid())); setInterval(() => {}, 1000);\n"
        folder = make_plugin(base, "jsuser", "javascript", "main.js", script)
        config = host_config([base], ["jsuser"])
        host = PluginHost(config, "nats://127.0.0.1:1", {"jsuser": (folder, load(folder))})
        await host.start()
        try:
            record = config.state_dir / "plugins" / "jsuser" / "uid"
            for _ in range(300):
                if record.exists() and record.read_text():
                    break
                await asyncio.sleep(0.05)
            plan = host.plugins["jsuser"].plan
            assert plan is not None and plan.account is not None, plan
            assert plan.account.name == "tuxpilot-p-jsuser" and plan.unconfined is None
            assert record.read_text() == str(plan.account.uid)
        finally:
            await host.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
