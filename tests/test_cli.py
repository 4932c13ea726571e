"""The command line as an operator meets it: real subprocesses, one line per failure, the same exit
code for the same condition, user text shown as it is, names never cut."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from tuxpilot.cli.render import describe
from tuxpilot.protocol.manifest import builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest

from tests.conftest import tuxpilot_exe

EXIT_UNAVAILABLE = 3


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=env, timeout=timeout)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    return {**env, "TUXPILOT_CONFIG": "/dev/null", "TUXPILOT_STATE_DIR": str(tmp_path / "state"), **extra}


@pytest.mark.parametrize("url", ["nats://127.0.0.1:1", "nats://no-such-host.invalid:4222"])
@pytest.mark.parametrize(
    "command",
    [["status"], ["call", "h", "sysmon", "top_processes"], ["audit"], ["events", "tail"],
     ["event", "emit", "cpu.high"], ["plugin", "list", "--live"], ["plugin", "run", str(builtin_dir() / "sysmon")]],
    ids=lambda c: " ".join(c[:2]) if isinstance(c, list) else c,
)
def test_an_unreachable_server_is_one_line_naming_the_url_and_exit_3(
    tmp_path: Path, url: str, command: list[str]
) -> None:
    # These retried forever; the subprocess timeout is what a hang would hit.
    done = run(*command, env=clean_env(tmp_path, TUXPILOT_NATS_URL=url), timeout=30)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert url in lines[0]


@pytest.mark.parametrize(
    "command", [["status"], ["audit"], ["agent"], ["auth", "context"], ["plugin", "run", str(builtin_dir() / "sysmon")]]
)
def test_no_server_at_all_is_exit_3_everywhere(tmp_path: Path, command: list[str]) -> None:
    done = run(*command, env=clean_env(tmp_path), timeout=30)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert "tuxpilot up" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_user_text_is_never_taken_as_markup(tmp_path: Path) -> None:
    # The pattern's `[a-z0-9_-]` parts were eaten as markup tags.
    done = run("event", "emit", "memoryhigh", env=clean_env(tmp_path))
    assert done.returncode == 2
    assert "[a-z0-9_-]{1,64}" in done.stderr

    console = Console(record=True, width=400, color_system=None)
    result = {"status": "refused", "plugin": "demo", "action": "echo", "reason": "bad_request",
              "message": "[bold]not bold[/bold] [red]x"}
    console.print(describe("tuxpilot.result.h.demo.echo", json.dumps(result).encode()))
    event = {"host": "h", "type": "memory.high", "severity": "warning", "resource": "[/]"}
    console.print(describe("tuxpilot.evt.h.memory.high", json.dumps(event).encode()))
    shown = console.export_text()
    assert "[bold]not bold[/bold] [red]x" in shown and "resource=[/]" in shown


def test_schema_show_gives_an_actions_params_schema(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    done = run("schema", "show", "sysmon.top_processes", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == load_manifest(builtin_dir() / "sysmon").actions["top_processes"].params
    unknown = run("schema", "show", "sysmon.top_procs", env=env)
    assert unknown.returncode == 2 and "top_processes" in unknown.stderr
    contract = run("schema", "show", "result", env=env)
    assert contract.returncode == 0 and json.loads(contract.stdout)["title"]


def test_plugin_list_piped_at_80_columns_cuts_no_name(tmp_path: Path) -> None:
    env = clean_env(tmp_path, COLUMNS="80")
    done = run("plugin", "list", env=env)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    words = set(done.stdout.replace("│", " ").split())
    for folder in (builtin_dir() / "docker", builtin_dir() / "sysmon"):
        manifest = load_manifest(folder)
        assert set(manifest.actions) <= words, sorted(set(manifest.actions) - words)
    assert max(len(line) for line in done.stdout.splitlines()) <= 80


def test_a_plugin_dir_may_be_the_plugin_folder_itself(tmp_path: Path) -> None:
    folder = tmp_path / "mine" / "tidy"
    folder.mkdir(parents=True)
    doc = (builtin_dir() / "sysmon" / "plugin.toml").read_text().replace('name = "sysmon"', 'name = "tidy"')
    (folder / "plugin.toml").write_text(doc)
    for where in (folder, folder.parent):
        env = clean_env(tmp_path, TUXPILOT_PLUGIN_DIRS=json.dumps([str(where)]))
        done = run("plugin", "list", "--json", env=env)
        assert done.returncode == 0, done.stderr
        assert {p["name"]: p["path"] for p in json.loads(done.stdout)}["tidy"] == str(folder)

    missing = clean_env(tmp_path, TUXPILOT_PLUGIN_DIRS=json.dumps([str(tmp_path / "nowhere")]))
    done = run("plugin", "list", env=missing)
    assert done.returncode == 0 and str(tmp_path / "nowhere") in done.stderr


def test_revoking_a_permission_never_granted_changes_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "host.toml"
    conf.write_text("# the operator's notes\n[gate]\ncooldown_s = 0\n")
    before = conf.read_bytes()
    env = clean_env(tmp_path)
    done = run("--config", str(conf), "plugin", "revoke", "docker", "system_access", env=env)
    assert done.returncode == 0, done.stderr
    assert "was not granted" in done.stdout and "nothing changed" in done.stdout
    assert conf.read_bytes() == before

    granted = run("--config", str(conf), "plugin", "grant", "docker", "system_access", env=env)
    assert granted.returncode == 0, granted.stderr
    again = run("--config", str(conf), "plugin", "grant", "docker", "system_access", env=env)
    assert "already granted" in again.stdout
    revoked = run("--config", str(conf), "plugin", "revoke", "docker", "system_access", env=env)
    assert revoked.returncode == 0 and "system_access" not in revoked.stdout.split("(in")[0]


def test_a_call_to_a_wildcard_host_is_refused_not_sent(tmp_path: Path) -> None:
    # It used to answer "no responders" as if the plugin were down: NATS never fans a request out.
    done = run("call", "*", "sysmon", "top_processes", env=clean_env(tmp_path, TUXPILOT_NATS_URL="nats://127.0.0.1:1"))
    assert done.returncode == 2
    assert "one host" in done.stderr and len(done.stderr.strip().splitlines()) == 1
