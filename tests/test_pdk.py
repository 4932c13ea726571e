"""The plugin development kit: `plugin new` scaffolds a plugin of each runtime that passes `plugin test` as
it is (its own tests, then the conformance check on an embedded server and agent), and the check finds
what is wrong with a plugin that breaks the protocol."""

from __future__ import annotations

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
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
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
