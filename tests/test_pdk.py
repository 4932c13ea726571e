"""The plugin development kit: `plugin new` scaffolds a plugin of each runtime that passes `plugin test` as
it is (its own tests, then the conformance check on an embedded server and agent), and the check finds
what is wrong with a plugin that breaks the protocol."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tuxpilot.pdk import check, scaffold
from tuxpilot.protocol.errors import ConfigError

from tests.conftest import need

TUXPILOT = str(Path(sys.executable).with_name("tuxpilot"))
NEEDS = {"python": (), "javascript": ("node", "npm"), "wasm": ("clang",)}


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")} | {"TUXPILOT_CONFIG": "/dev/null"}
    return subprocess.run([TUXPILOT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad.Name"}, "plugin name"),
        ({"runtime": "cobol"}, "runtime"),
        ({"category": "games"}, "category"),
        ({"event": "memory"}, "event type"),
    ],
)
def test_new_refuses_what_would_not_load(tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    args = {"name": "ok", "runtime": "python", "category": "custom", **kwargs}
    with pytest.raises(ConfigError, match=message):
        scaffold.new(args.pop("name"), folder=tmp_path / "p", **args)
    assert not (tmp_path / "p").exists()


def test_new_does_not_write_into_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        scaffold.new("p", runtime="python", category="custom", folder=tmp_path / "p")
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["mine.txt"]


def test_a_description_cannot_break_out_of_the_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    scaffold.new("p", runtime="python", category="custom", folder=folder,
                 description='x"\nruntime = "native"\n# */ """')
    from tuxpilot.protocol.manifest import load

    manifest = load(folder)
    assert manifest.runtime == "python" and "\n" not in manifest.description


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["python", "javascript", "wasm"])
def test_a_new_plugin_passes_plugin_test_as_it_is(tmp_path: Path, runtime: str) -> None:
    for program in NEEDS[runtime]:
        need(program, shutil.which(program) is not None, f"{program} is not on PATH")
    made = cli("plugin", "new", "hello", "--runtime", runtime, "--category", "monitoring", "--dir", str(tmp_path),
               cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "note: npm could not" not in made.stderr  # the lockfile was written from npm's cache
    tested = cli("plugin", "test", str(tmp_path / "hello"), cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "own tests: passed" in tested.stdout
    assert "FAIL" not in tested.stdout
    assert "hello: 15 of 15 checks passed" in tested.stdout


BROKEN = '''
from tuxpilot import Plugin

plugin = Plugin.here(__file__)


@plugin.on("memory.high")
async def on_event(event, ctx):
    # Breaks twice: it fails on an event without a value (optional in the protocol), and it proposes
    # params its own schema refuses.
    return [ctx.propose("hello", {"name": event.value * 2})]


@plugin.action("hello")
def hello(params, ctx):
    return {"text": "hi"}


if __name__ == "__main__":
    plugin.run()
'''


@pytest.mark.slow
async def test_the_check_names_what_a_broken_plugin_does_wrong(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    scaffold.new("broken", runtime="python", category="custom", folder=folder)
    (folder / "plugin.py").write_text(BROKEN)
    report = await check.check(folder)
    failed = {f.check: f.detail for f in report.findings if not f.ok}
    assert not report.passed
    assert "proposes hello with params its schema refuses (/name" in failed[
        "event memory.high: its proposal is valid, for its own declared actions with valid params"]
    assert "handler fails on an event without its optional fields" in failed[
        "a bare memory.high event (no value, resource or data): handled and acked"]
    # What it does right is not reported as wrong.
    assert "hello: a body that is not JSON is refused bad_request (400)" not in failed
    assert "the plugin is still serving, never restarted" not in failed


# Version 2 of a scaffolded plugin: greets "db" differently and says nothing about "quiet".
V2_HANDLER = '''
@plugin.action("shadowed")
def shadowed(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    # Shadow mode must never run an action: this one leaves a mark if it does.
    (Path(__file__).parent / "executed").write_text(ctx.action_id or "")
    return {}


@plugin.on("memory.high")
async def on_event(event: Event, ctx: Context) -> list[ProposedAction]:
    name = event.resource or event.host
    if name == "quiet":
        return []
    if name == "db":
        return [ctx.propose("hello", {"name": "database"}, reason="v2"), ctx.propose("shadowed", {})]
    return [ctx.propose("hello", {"name": name}, reason="v2")]
'''


def _version_2(folder: Path) -> None:
    code = (folder / "plugin.py").read_text()
    start = code.index('@plugin.on("memory.high")')
    end = code.index('@plugin.action("hello")')
    (folder / "plugin.py").write_text(code[:start] + V2_HANDLER.lstrip() + "\n\n" + code[end:])
    code = (folder / "plugin.py").read_text()
    imports = "from pathlib import Path\nfrom typing import Any"
    (folder / "plugin.py").write_text(code.replace("from typing import Any", imports))
    manifest = (folder / "plugin.toml").read_text().replace('version = "0.1.0"', 'version = "0.2.0"')
    (folder / "plugin.toml").write_text(manifest + '\n[actions.shadowed]\ndescription = "Marks that it ran."\n')


@pytest.mark.slow
async def test_replay_shows_what_a_new_version_would_propose_against_the_fleets_audit(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from tuxpilot.agent import audit
    from tuxpilot.pdk import replay
    from tuxpilot.pdk.embedded import embedded
    from tuxpilot.protocol.models import Event

    v1, v2 = tmp_path / "v1" / "greeter", tmp_path / "v2" / "greeter"
    scaffold.new("greeter", runtime="python", category="custom", folder=v1)
    scaffold.new("greeter", runtime="python", category="custom", folder=v2)
    _version_2(v2)
    # The fleet: a real agent and gate (actions executed, not dry) running version 1, and real events.
    async with embedded(v1, host="web-1", dry_run=False) as fleet:
        since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        for resource in ("web", "db", "quiet", "cache"):
            await fleet.publish_event(Event.new("memory.high", "web-1", value=96.0, resource=resource))
        # An event another plugin's type: not replayed.
        await fleet.publish_event(Event.new("disk.low", "web-1", value=3.0, resource="/"))

        async def recorded() -> int:
            return len(await audit.read(fleet.operator, fleet.subjects, plugin="greeter"))

        for _ in range(200):
            if await recorded() >= 4:
                break
            await asyncio.sleep(0.1)
        assert await recorded() == 4

        result = await replay.replay(fleet.operator, fleet.subjects, v2, audit.parse_since("1h"))
        kinds = {d.event.resource: d.kind for d in result.diffs}
        assert kinds == {"web": "same", "db": "changed", "quiet": "gone", "cache": "same"}
        assert not (v2 / "executed").exists()  # proposed in shadow mode, never executed
        [db] = [d for d in result.diffs if d.event.resource == "db"]
        assert [(p.action, p.params, p.decided) for p in db.before] == [("hello", {"name": "db"}, "ok")]
        assert [(p.action, p.params) for p in db.after] == [("hello", {"name": "database"}), ("shadowed", {})]
        lines = replay.render(result)
        assert "memory.high: 4 events: 2 same, 1 changed, 1 gone" in lines
        assert any(line.startswith("  ~ ") and 'was hello {"name":"db"} (ok); now hello {"name":"database"}' in line
                   for line in lines), lines
        # Nothing was executed for the replay: the fleet's audit holds only its own four records.
        assert await recorded() == 4

        # The command, as an operator runs it against the fleet's server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
        env.update(TUXPILOT_STATE_DIR=str(fleet.state_dir), TUXPILOT_HOST_ID="web-1")
        proc = await asyncio.create_subprocess_exec(
            TUXPILOT, "plugin", "test", str(v2), "--replay", since, "--server", fleet.url, "--json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, stderr.decode()
        doc = json.loads(stdout)
        assert doc["version"] == "0.2.0" and doc["events"] == 4
        assert doc["types"]["memory.high"]["counts"] == {"same": 2, "changed": 1, "new": 0, "gone": 1, "none": 0}


class View:
    """The lines a `plugin dev` process prints, read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for(self, *needles: str, limit: float = 60) -> str:
        """The first line (from now on) holding every needle."""
        assert self.proc.stdout is not None
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"no line with {needles} in:\n" + "\n".join(self.lines)
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                continue
            assert raw, f"plugin dev ended (no line with {needles}):\n" + "\n".join(self.lines)
            line = raw.decode().rstrip()
            self.lines.append(line)
            if all(n in line for n in needles):
                return line


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


# Where each runtime's scaffold says hello, and the edit that makes it say hi.
EDITS = {"python": ("plugin.py", 'f"hello {params', 'f"hi {params'),
         "javascript": ("handlers.js", "`hello ${params", "`hi ${params"),
         "wasm": ("plugin.c", '"hello %s"', '"hi %s"')}


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["python", "javascript", "wasm"])
async def test_plugin_dev_restarts_on_a_change_and_shows_the_emitted_events_proposal_and_result(
    tmp_path: Path, runtime: str
) -> None:
    import re
    import signal

    for program in NEEDS[runtime]:
        need(program, shutil.which(program) is not None, f"{program} is not on PATH")
    folder = tmp_path / "greeter"
    scaffold.new("greeter", runtime=runtime, category="custom", folder=folder)
    source, before, after = EDITS[runtime]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    # No local `tuxpilot up` there.
    env.update(TUXPILOT_STATE_DIR=str(tmp_path / "state"), TUXPILOT_CONFIG="/dev/null", COLUMNS="200")
    proc = await asyncio.create_subprocess_exec(
        TUXPILOT, "plugin", "dev", str(folder), "--emit", "memory.high", "--value", "96", "--resource", "web",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    view = View(proc)
    pids: list[int] = []
    try:
        await view.wait_for("starting an embedded one")
        if runtime == "wasm":
            await view.wait_for("building: sh build.sh")
        if runtime == "javascript":
            await view.wait_for("installing the plugin's dependencies")
        pids.append(int(re.findall(r"pid (\d+)", await view.wait_for("started greeter 0.1.0"))[0]))
        await view.wait_for("event", "memory.high", "resource=web")
        await view.wait_for("proposal", 'hello {"name":"web"}')
        await view.wait_for("result", "greeter.hello ok", '{"text":"hello web"}')

        code = (folder / source).read_text()
        assert before in code
        (folder / source).write_text(code.replace(before, after))
        await view.wait_for(f"changed: {source}; restarting (restart 1)")
        if runtime == "wasm":
            await view.wait_for("building: sh build.sh")
        pids.append(int(re.findall(r"pid (\d+)", await view.wait_for("started greeter 0.1.0"))[0]))
        assert not _alive(pids[0])  # the first process was stopped before the second started
        await view.wait_for("proposal", 'hello {"name":"web"}')
        await view.wait_for("result", "greeter.hello ok", '{"text":"hi web"}')

        if runtime == "javascript":  # a new lockfile: the dependencies are installed from it again
            lock = folder / "package-lock.json"
            lock.write_text(json.dumps(json.loads(lock.read_text()), indent=1) + "\n")
            await view.wait_for("changed: package-lock.json; restarting")
            await view.wait_for("installing the plugin's dependencies")
            await view.wait_for("result", "greeter.hello ok", '{"text":"hi web"}')

        # A change that breaks the manifest: nothing starts, and it says why, until the next change.
        manifest = (folder / "plugin.toml").read_text()
        (folder / "plugin.toml").write_text(manifest.replace(f'runtime = "{runtime}"', 'runtime = "cobol"'))
        await view.wait_for("not started", "runtime")
        (folder / "plugin.toml").write_text(manifest)
        pids.append(int(re.findall(r"pid (\d+)", await view.wait_for("started greeter 0.1.0"))[0]))
        await view.wait_for("result", "greeter.hello ok", '{"text":"hi web"}')
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0, "\n".join(view.lines)
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.slow
async def test_plugin_dev_runs_the_plugin_through_the_local_tuxpilot_up(tmp_path: Path) -> None:
    import signal

    from tests.test_nats_context import Up

    folder = tmp_path / "greeter"
    scaffold.new("greeter", runtime="python", category="custom", folder=folder)
    up = Up(tmp_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            TUXPILOT, "plugin", "dev", str(folder), "--local", "--emit", "memory.high", "--resource", "web",
            env={**up.env, "COLUMNS": "200"}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        view = View(proc)
        try:
            await view.wait_for("using the local agent")
            await view.wait_for("greeter is serving")
            await view.wait_for("proposal", 'hello {"name":"web"}')
            # The local agent's gate decided and the plugin ran it, as the agent's audit shows too.
            await view.wait_for("result", "greeter.hello ok", '{"text":"hello web"}')
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0, "\n".join(view.lines)
        audit = up.cli("audit", "--plugin", "greeter", "--json")
        assert '"status": "ok"' in audit.stdout or '"status":"ok"' in audit.stdout, audit.stdout + audit.stderr
    finally:
        up.stop()


def test_plugin_dev_local_without_a_local_agent_says_so(tmp_path: Path) -> None:
    scaffold.new("greeter", runtime="python", category="custom", folder=tmp_path / "greeter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    env.update(TUXPILOT_STATE_DIR=str(tmp_path / "state"), TUXPILOT_CONFIG="/dev/null")
    proc = subprocess.run([TUXPILOT, "plugin", "dev", str(tmp_path / "greeter"), "--local"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no local `tuxpilot up`" in proc.stderr
