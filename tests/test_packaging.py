"""A non-editable wheel carries the schemas, built-in plugins and the development kit's templates: built,
installed into a fresh venv, run."""

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
    _scaffolds_and_checks_plugins(exe, tmp_path)


def _scaffolds_and_checks_plugins(exe: str, tmp_path: Path) -> None:
    """The development kit's templates, the JS SDK copy and the C guest header come from the wheel, and
    `plugin test` checks a plugin on an embedded server from there (its own tests need pytest, which a
    plain install has not: --no-own)."""
    import shutil

    runtimes = ["python", "wasm"] + (["javascript"] if shutil.which("npm") else [])
    for runtime in runtimes:
        made = subprocess.run([exe, "plugin", "new", f"p-{runtime}", "--runtime", runtime], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert made.returncode == 0, made.stderr
    assert (tmp_path / "p-wasm" / "include" / "tuxpilot_guest.h").is_file()
    if "javascript" in runtimes:
        assert (tmp_path / "p-javascript" / "sdk" / "src" / "plugin.js").is_file()
        assert (tmp_path / "p-javascript" / "package-lock.json").is_file()
    tested = subprocess.run([exe, "plugin", "test", "p-python", "--no-own"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert tested.returncode == 0 and "p-python: 15 of 15 checks passed" in tested.stdout, tested.stdout + tested.stderr
