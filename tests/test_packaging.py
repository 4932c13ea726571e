"""A non-editable wheel carries the schemas and built-in plugins: built, installed into a fresh venv, run."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_wheel_installs_and_finds_its_schemas_and_plugins(tmp_path: Path, wheel: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = env_dir / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(wheel)], check=True, capture_output=True, timeout=600)

    # Run from elsewhere so nothing can come from the checkout.
    exe = str(env_dir / "bin" / "tuxpilot")
    schemas = subprocess.run([exe, "schema", "list"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert schemas.returncode == 0, schemas.stderr
    for name in ("event", "proposal", "result", "error", "manifest", "metrics"):
        assert name in schemas.stdout

    plugins = subprocess.run(
        [exe, "plugin", "list", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert plugins.returncode == 0, plugins.stderr
    listed = {p["name"]: p for p in json.loads(plugins.stdout)}
    assert "sysmon" in listed
    assert "/site-packages/tuxpilot/_data/plugins/" in listed["sysmon"]["path"]
    assert "noop" not in listed  # the bench's plugin ships apart from the built-in ones
    # The package is `tuxpilot`; nothing installs a top-level module called `agent`.
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    assert not (site / "agent").exists()
    probe = "from tuxpilot import Plugin; print(Plugin.__module__)"
    sdk = subprocess.run([str(env_dir / "bin" / "python"), "-c", probe],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert sdk.stdout.strip() == "tuxpilot.sdk.plugin", sdk.stderr

    server = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c",
         "from tuxpilot.bus.server import server_binary; print(server_binary())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert server.returncode == 0 and server.stdout.strip().startswith(str(env_dir)), server
