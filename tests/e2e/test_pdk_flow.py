"""From an author's machine to another host, as the README's "Plugin development kit" transcript shows:
`plugin new` → `plugin test` → `key new` → `plugin package` → `plugin publish` (to the fleet registry on
the other host's bus) → on that host, `key trust` → `plugin install NAME` by name from the registry; the
installed plugin then serves its action through the host's gate and acts on a real event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tuxpilot.bus import auth
from tuxpilot.bus.connect import url_file
from tuxpilot.protocol.names import Subjects

from tests.conftest import tuxpilot_exe

pytestmark = pytest.mark.slow

HOST = "web-1"


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, f"tuxpilot {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


def wait(what: str, check: object, limit: float = 40) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_new_test_package_publish_and_install_on_another_host_by_name(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    # The other host: `tuxpilot up` on web-1, nothing installed yet.
    web_state = tmp_path / "web-1"
    web = {**clean, "TUXPILOT_STATE_DIR": str(web_state), "TUXPILOT_HOST_ID": HOST, "TUXPILOT_CONFIG": os.devnull,
           "TUXPILOT_MONITOR_ENABLED": "false", "TUXPILOT_RUN_PLUGINS": "[]"}
    web_log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([tuxpilot_exe(), "up", "--quiet"], stdout=web_log, stderr=subprocess.STDOUT, env=web)
    try:
        wait("tuxpilot up on web-1", lambda: subprocess.run([tuxpilot_exe(), "status", "--json"], env=web,
                                                           capture_output=True).returncode == 0)
        url = url_file(web_state).read_text().strip()
        # The author's machine: its own state (where its signing key lives), no agent.
        work = tmp_path / "work"
        work.mkdir()
        dev = {**clean, "TUXPILOT_STATE_DIR": str(tmp_path / "dev"), "TUXPILOT_HOST_ID": "dev",
               "TUXPILOT_CONFIG": os.devnull}

        made = run(dev, "plugin", "new", "greeter", "--category", "monitoring", cwd=work)
        assert f"created {work / 'greeter'} (python)" in made.stdout
        tested = run(dev, "plugin", "test", "greeter", cwd=work)
        assert "greeter: 15 of 15 checks passed" in tested.stdout, tested.stdout
        key = run(dev, "key", "new", "acme", cwd=work)
        public = next(line for line in key.stdout.splitlines() if line.startswith("ed25519:"))
        packaged = run(dev, "plugin", "package", "greeter", cwd=work)
        assert "greeter-0.1.0.tpkg: greeter 0.1.0" in packaged.stdout and "signed by acme" in packaged.stdout
        # Published to the fleet registry on web-1's bus, with a credential that may publish there.
        operator = auth.credential_file(web_state, auth.operator_user(Subjects("tuxpilot", HOST)).name)
        publisher = {**dev, "TUXPILOT_NATS_URL": url, "TUXPILOT_NATS_USER_FILE": str(operator)}
        published = run(publisher, "plugin", "publish", "greeter-0.1.0.tpkg", cwd=work)
        assert "published greeter@0.1.0 to fleet" in published.stdout, published.stdout

        # On web-1: trust the author's key, install by name from the registry.
        run(web, "key", "trust", public, cwd=tmp_path)
        found = run(web, "plugin", "search", "greeter", cwd=tmp_path)
        assert "greeter" in found.stdout
        installed = run(web, "plugin", "install", "greeter", cwd=tmp_path)
        assert "installed greeter 0.1.0" in installed.stdout and "running and healthy" in installed.stdout, \
            installed.stdout
        called = run(web, "call", HOST, "greeter", "hello", '{"name": "ops"}', cwd=tmp_path)
        assert json.loads(called.stdout) == {"status": "ok", "data": {"text": "hello ops"}}
        # And it acts on a real event: its proposal goes through web-1's gate and is executed.
        run(web, "event", "emit", "memory.high", "--value", "97", "--resource", "web", cwd=tmp_path)

        def proposed_and_done() -> bool:
            audit = run(web, "audit", "--plugin", "greeter", "--json", cwd=tmp_path)
            return any(r.get("source") == "proposal" and r.get("status") == "ok"
                       and r.get("params") == {"name": "web"} for r in json.loads(audit.stdout))

        wait("the event's proposal executed on web-1", proposed_and_done)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        web_log.close()
