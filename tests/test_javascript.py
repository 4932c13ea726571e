"""The `javascript` runtime (runtimes/javascript.py): V8's memory limits, dependencies installed from the
lockfile without running anyone's install scripts, and the NATS permissions a manifest's `reads` gives."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import structlog
from nats.errors import TimeoutError as NatsTimeout
from tuxpilot.bus import auth
from tuxpilot.bus.server import NatsServer
from tuxpilot.child import child_setup
from tuxpilot.protocol.manifest import Manifest, builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.names import Subjects
from tuxpilot.runtimes import javascript

from tests.conftest import need

PATH = os.environ.get("PATH", os.defpath)
HEAP_SCRIPT = """
const v8 = await import("node:v8");
console.log(JSON.stringify({heap_mb: Math.round(v8.getHeapStatistics().heap_size_limit / 1048576)}));
if (process.argv[2] === "grow") { const a = []; for (;;) a.push(new Array(1e5).fill(Math.random())); }
"""


@pytest.fixture
def node() -> str:
    found = shutil.which("node")
    need("node", found is not None, "the javascript runtime needs node on PATH")
    assert found is not None
    return found


def run_node(script: Path, limits: dict[str, int], *args: str) -> subprocess.CompletedProcess[str]:
    launch = javascript.JavaScript().launch(script.parent, _manifest(script.name), {"memory_mb": 64}, PATH)
    argv = [*launch.argv, *args]
    return subprocess.run(argv, preexec_fn=child_setup(limits), capture_output=True, text=True, timeout=60)


def _manifest(entry: str) -> Manifest:
    return Manifest.from_doc({"name": "heap", "version": "1.0.0", "description": "", "category": "custom",
                              "runtime": "javascript", "entry_point": entry, "api_version": "1"})


def test_memory_mb_caps_v8s_heap_and_leaves_node_the_address_space_it_needs(node: str, tmp_path: Path) -> None:
    script = tmp_path / "heap.mjs"
    script.write_text(HEAP_SCRIPT)
    launch = javascript.JavaScript().launch(tmp_path, _manifest(script.name), {"memory_mb": 64, "open_files": 64},
                                            PATH)
    assert "--max-old-space-size=64" in launch.argv
    limits = launch.rlimits
    assert limits == {"memory_mb": 64 + javascript.ADDRESS_HEADROOM_MB, "open_files": 64}

    started = run_node(script, limits)
    assert started.returncode == 0, started.stderr
    # --max-old-space-size=64: V8's whole heap limit (old space plus the young generation) stays small.
    assert json.loads(started.stdout)["heap_mb"] < 200

    # A plugin that keeps allocating dies of V8's own heap limit (SIGABRT), and the host restarts it.
    grown = run_node(script, limits, "grow")
    assert grown.returncode == -6, grown.stderr[-500:]
    assert "heap limit" in grown.stderr


@pytest.mark.parametrize("address_space_mb", [64, 256])
def test_rlimit_as_of_memory_mb_alone_would_not_even_start_node(node: str, tmp_path: Path,
                                                                address_space_mb: int) -> None:
    """Why the runtime adds headroom: the address space node reserves is far above what it uses."""
    script = tmp_path / "heap.mjs"
    script.write_text(HEAP_SCRIPT)
    try:
        done = run_node(script, {"memory_mb": address_space_mb})
    except subprocess.TimeoutExpired:
        return  # a hang is the other way it fails
    assert done.returncode != 0 and not done.stdout


def test_a_host_without_node_cannot_run_a_javascript_plugin(tmp_path: Path) -> None:
    (tmp_path / "heap.mjs").write_text(HEAP_SCRIPT)
    lacking = javascript.JavaScript().missing(tmp_path, _manifest("heap.mjs"), str(tmp_path / "empty"))
    assert lacking is not None and "node is not on PATH" in lacking


@pytest.fixture
def npm() -> str:
    found = shutil.which("npm")
    need("npm", found is not None, "JS plugin dependencies are installed with npm")
    assert found is not None
    return found


async def test_dependencies_come_from_the_lockfile_and_no_install_script_runs(npm: str, tmp_path: Path) -> None:
    """A dependency's install script would run as the agent's user (root): it must not run at all."""
    marker = tmp_path / "pwned"
    plugin = tmp_path / "plugin"
    evil = plugin / "evil"
    evil.mkdir(parents=True)
    (evil / "package.json").write_text(json.dumps({
        "name": "evil", "version": "1.0.0",
        "scripts": {"preinstall": f"touch {marker}", "install": f"touch {marker}", "postinstall": f"touch {marker}"},
    }))
    (plugin / "package.json").write_text(json.dumps({"name": "p", "version": "1.0.0", "private": True,
                                                     "dependencies": {"evil": "file:./evil"}}))
    (plugin / ".npmrc").write_text("install-links=true\n")
    await asyncio.to_thread(
        subprocess.run, [npm, "install", "--package-lock-only", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=plugin, check=True, capture_output=True, timeout=120,
    )
    log = structlog.get_logger("test")

    assert not javascript.installed(plugin)
    assert await javascript.install(plugin, log) is True
    assert (plugin / "node_modules" / "evil" / "package.json").is_file()
    assert not marker.exists(), "a dependency's install script ran"
    assert javascript.installed(plugin)
    assert await javascript.install(plugin, log) is False  # once per lockfile

    lock = json.loads((plugin / "package-lock.json").read_text())
    lock["name"] = "p2"
    (plugin / "package-lock.json").write_text(json.dumps(lock))
    assert not javascript.installed(plugin)  # a new lockfile is installed again


async def test_a_failing_install_says_why(npm: str, tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(json.dumps({"name": "p", "version": "1.0.0",
                                                       "dependencies": {"gone": "file:./gone"}}))
    (tmp_path / "package-lock.json").write_text(json.dumps({"name": "p", "lockfileVersion": 3, "packages": {}}))
    with pytest.raises(javascript.InstallError, match="npm ci in"):
        await javascript.install(tmp_path, structlog.get_logger("test"))


# -- what `reads` lets a plugin's NATS user subscribe to ---------------------------------------------


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[NatsServer, Path, dict[str, auth.User]]]:
    subjects = Subjects("tuxpilot", "h1")
    manifests = {"prometheus": load_manifest(builtin_dir() / "prometheus"),
                 "sysmon": load_manifest(builtin_dir() / "sysmon")}
    users = auth.users_for(subjects, manifests)
    hashes = auth.provision(tmp_path / "state", users)
    server = NatsServer(tmp_path / "nats", extra_config=auth.server_config(users, hashes)).start()
    yield server, tmp_path / "state", {u.plugin or u.role: u for u in users}
    server.stop()


async def test_reads_allows_exactly_this_hosts_results_and_metrics(secured: tuple[NatsServer, Path,
                                                                                   dict[str, auth.User]]) -> None:
    server, _, users = secured
    prom, sysmon, agent = users["prometheus"], users["sysmon"], users["agent"]

    async def receives(user: auth.User, subject: str, publish_on: str | None = None) -> bool:
        """Whether `user` may subscribe to `subject` and gets what the agent publishes on `publish_on`."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(server.url, user=user.name, password=user.password, inbox_prefix=user.inbox,
                                allow_reconnect=False, error_cb=on_error)
        pub = await nats.connect(server.url, user=agent.name, password=agent.password, inbox_prefix=agent.inbox,
                                 allow_reconnect=False)
        try:
            sub = await nc.subscribe(subject)
            await nc.flush()
            await asyncio.sleep(0.1)  # a violation arrives as an asynchronous -ERR
            if any("permissions violation" in e.lower() for e in errors):
                return False
            if publish_on is None:
                return True
            await pub.publish(publish_on, b"{}")
            await pub.flush()
            try:
                await sub.next_msg(timeout=0.5)
            except NatsTimeout:
                return False
            return True
        finally:
            await nc.close()
            await pub.close()

    assert await receives(prom, "tuxpilot.result.h1.>", "tuxpilot.result.h1.sysmon.report")
    assert await receives(prom, "tuxpilot.metrics.h1", "tuxpilot.metrics.h1")
    # Not what it does not declare: sysmon reads nothing, and no plugin reads another host's.
    assert not await receives(sysmon, "tuxpilot.result.h1.>")
    assert not await receives(sysmon, "tuxpilot.metrics.h1")
    assert not await receives(prom, "tuxpilot.result.>")
    assert not await receives(prom, "tuxpilot.result.h2.>")
    assert not await receives(prom, "tuxpilot.metrics.h2")
    assert not await receives(prom, "tuxpilot.proposal.>")
