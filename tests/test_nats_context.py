"""`tuxpilot auth context` readies the `nats` CLI: the README's `nats req` / `nats sub` lines, run as
written, through a client that is not TuxPilot's (the official NATS JavaScript client reading the
`nats` CLI's context files), against a real `tuxpilot up`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuxpilot.settings import default_host_id

from tests.conftest import need, tuxpilot_exe

pytestmark = pytest.mark.slow

JS = Path(__file__).resolve().parent / "js"
URL_LINE = re.compile(r"up on (nats://127\.0\.0\.1:\d+)")


def _node() -> str:
    node = shutil.which("node")
    need("node", node is not None, "the NATS JavaScript client runs on node (Debian: nodejs)")
    installed = (JS / "node_modules" / "@nats-io" / "transport-node").is_dir()
    need("@nats-io/transport-node", installed, f"run `npm ci` in {JS}")
    assert node is not None
    return node


class Up:
    """`tuxpilot up` with its own state dir and a home of its own (where `nats` keeps its contexts)."""

    def __init__(self, tmp: Path):
        self.home = tmp / "home"
        self.home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_") and k != "XDG_CONFIG_HOME"}
        self.env = {**env, "HOME": str(self.home), "TUXPILOT_STATE_DIR": str(tmp / "state"),
                    "TUXPILOT_CONFIG": "/dev/null"}
        self.proc = subprocess.Popen([tuxpilot_exe(), "up"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=self.env)
        self.url = self._read_url()

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = URL_LINE.search(line)
            if m:
                return m.group(1)
        raise AssertionError("tuxpilot up printed no URL")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=self.env, timeout=60)

    def shell(self, line: str, node: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """One README line, as written, in bash, with `nats` the JavaScript stand-in."""
        script = f'nats() {{ "{node}" "{JS / "nats.mjs"}" "$@"; }}\n{line}\n'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=self.env, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path)
    yield running
    running.stop()


def readme_section(repo_root: Path, title: str) -> str:
    text = (repo_root / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start : text.index("\n## ", start + 1)]


def nats_lines(section: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The section's `nats req`/`nats sub` commands, and its `$ nats req` examples with the error code shown."""
    commands, shown = [], []
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("nats req ", "nats sub ")):
            commands.append(line.split("  #", 1)[0].strip())
        elif line.startswith("$ nats req "):
            reply = next(x for x in lines[i + 1 :] if x.startswith("{"))
            shown.append((line[2:], re.search(r'"code":"(\w+)"', reply).group(1)))  # type: ignore[union-attr]
    return commands, shown


def test_auth_context_makes_the_readmes_nats_lines_work_verbatim(up: Up, repo_root: Path) -> None:
    node = _node()
    if subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() != default_host_id():
        pytest.skip("this machine's short hostname is not its host id, which the README's lines assume")

    made = up.cli("auth", "context")
    assert made.returncode == 0, made.stderr
    host = default_host_id()
    path = up.home / ".config" / "nats" / "context" / f"tuxpilot-{host}.json"
    assert str(path) in made.stdout and "selected" in made.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["url"] == up.url
    assert doc["user"] == f"tuxpilot-{host}-operator" and doc["password"]
    assert doc["inbox_prefix"] == f"_INBOX_tuxpilot-{host}-operator"
    assert (up.home / ".config" / "nats" / "context.txt").read_text().strip() == f"tuxpilot-{host}"

    commands, shown = nats_lines(readme_section(repo_root, "Calling actions with `nats req`"))
    requests = [c for c in commands if c.startswith("nats req")]
    subs = [c for c in commands if c.startswith("nats sub")]
    assert len(requests) >= 4 and len(subs) >= 2 and len(shown) >= 2

    deadline = time.monotonic() + 30
    for line in requests:
        while True:  # the plugin may still be starting
            done = up.shell(line, node)
            if "No responders" not in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert done.returncode == 0, (line, done.stderr)
        assert json.loads(done.stdout)["status"] == "ok", (line, done.stdout)

    for line, code in shown:
        done = up.shell(line, node)
        assert done.returncode == 0, (line, done.stderr)
        assert json.loads(done.stdout)["code"] == code, (line, done.stdout)

    # `nats sub` runs until stopped: start each, make something happen, read what arrived.
    for line in subs:
        script = f'nats() {{ "{node}" "{JS / "nats.mjs"}" "$@" --timeout 20s; }}\n{line}\n'
        watcher = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=up.env)
        try:
            assert watcher.stderr is not None and watcher.stdout is not None
            assert "Subscribing" in watcher.stderr.readline()
            # An event to see, and an action the gate records (the operator's call is audited).
            assert up.cli("event", "emit", "cpu.high", "--value", "97").returncode == 0
            up.cli("call", host, "sysmon", "top_processes", '{"n": 1}')
            first = watcher.stdout.readline()
            assert first.startswith("[tuxpilot."), (line, first)
        finally:
            watcher.kill()
            watcher.wait()


def test_without_the_context_the_bare_client_is_refused(up: Up) -> None:
    # What the README says happens without it: the server refuses an anonymous client.
    node = _node()
    done = up.shell(f"nats -s {up.url} req tuxpilot.act.{default_host_id()}.sysmon.top_processes '{{}}'", node)
    assert done.returncode != 0 and "Authorization" in done.stderr


def test_a_selected_context_is_kept_and_the_output_says_how_to_select(up: Up) -> None:
    (up.home / ".config" / "nats").mkdir(parents=True)
    (up.home / ".config" / "nats" / "context.txt").write_text("prod\n")
    made = up.cli("auth", "context", "--name", "mine")
    assert made.returncode == 0, made.stderr
    assert "nats context select mine" in made.stdout
    assert (up.home / ".config" / "nats" / "context.txt").read_text().strip() == "prod"
    forced = up.cli("auth", "context", "--name", "mine", "--select")
    assert forced.returncode == 0 and (up.home / ".config" / "nats" / "context.txt").read_text().strip() == "mine"
    bad = up.cli("auth", "context", "--name", "../evil")
    assert bad.returncode == 2

    shown = up.cli("auth", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    files = {u["role"]: u for u in json.loads(shown.stdout)}
    assert files["operator"]["credential_file_exists"] is True
    assert Path(files["operator"]["credential_file"]).is_file()
    text = up.cli("auth", "show")
    assert f"credentials:   {files['operator']['credential_file']}" in text.stdout


def test_up_points_the_hosts_contexts_at_its_new_port(tmp_path: Path) -> None:
    node = _node()
    first = Up(tmp_path)
    try:
        assert first.cli("auth", "context").returncode == 0
        assert first.cli("auth", "context", "--name", "other").returncode == 0
    finally:
        first.stop()
    second = Up(tmp_path)  # same state dir and home, a new port
    try:
        for name in (f"tuxpilot-{default_host_id()}", "other"):
            doc = json.loads((second.home / ".config" / "nats" / "context" / f"{name}.json").read_text())
            assert doc["url"] == second.url, name
        line = f"nats req tuxpilot.act.{default_host_id()}.sysmon.top_processes '{{\"n\":1}}'"
        deadline = time.monotonic() + 30
        while True:
            done = second.shell(line, node)
            if "No responders" not in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "ok", done.stderr
    finally:
        second.stop()
