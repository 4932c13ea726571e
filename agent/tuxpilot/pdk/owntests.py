"""The plugin's own tests, as its runtime's authors expect to run them: pytest for Python, `npm ci` then
`npm test` for JavaScript (with the manifest in TUXPILOT_MANIFEST, as the host hands it over), and for
wasm its build (`build.sh`) then pytest on the Python side. The first half of `tuxpilot plugin test`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import load as load_manifest

OWN_TESTS_TIMEOUT_S = 600.0


@dataclass
class OwnTests:
    """How the plugin's own tests ran: the commands, their exit code, their output's tail."""

    ran: list[str] = field(default_factory=list)
    ok: bool = True
    output: str = ""
    note: str = ""


def own_tests(folder: Path, *, echo: Callable[[str], None] | None = None) -> OwnTests:
    """Run the plugin's own tests as its runtime's authors expect: pytest for Python, `npm ci` then `npm
    test` for JavaScript (the manifest in TUXPILOT_MANIFEST, as the host hands it over), and for wasm its
    build (`build.sh`) then pytest on the Python side."""
    manifest = load_manifest(folder)
    result = OwnTests()
    steps: list[tuple[list[str], dict[str, str]]] = []
    env = dict(os.environ)
    if manifest.runtime == "javascript":
        npm = shutil.which("npm")
        if npm is None:
            raise ConfigError("npm is not on PATH: a JavaScript plugin's tests run with `npm test`")
        package = _package_json(folder)
        if (folder / "package-lock.json").is_file():
            steps.append(([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline",
                           "--loglevel=error"], env))
        if "test" in package.get("scripts", {}):
            env = {**env, "TUXPILOT_MANIFEST": json.dumps(manifest.to_doc(), separators=(",", ":"))}
            steps.append(([npm, "test", "--silent"], env))
        else:
            result.note = "package.json has no `test` script: no tests of its own"
    elif manifest.runtime in ("python", "wasm"):
        if manifest.runtime == "wasm":
            if (folder / "build.sh").is_file():
                steps.append((["sh", str(folder / "build.sh")], env))
            elif not (folder / manifest.entry_point).is_file():
                raise ConfigError(f"{folder / manifest.entry_point} is not built and there is no build.sh to build it")
        if _has_python_tests(folder):
            steps.append(([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                           "-W", "ignore::pytest.PytestDeprecationWarning", str(folder)], env))
        else:
            result.note = "no tests of its own (tests/test_*.py or test_*.py)"
    else:
        result.note = f"runtime {manifest.runtime}: no convention for its own tests"
    for argv, step_env in steps:
        # As a person would type it in the folder: the program's name, no plumbing flags or paths.
        shown = " ".join(a for a in [Path(argv[0]).name, *argv[1:]]
                         if not a.startswith(("--rootdir", "-W", "ignore::", "no:", "-p", "--silent"))
                         and a != str(folder)).replace(str(folder) + "/", "")
        result.ran.append(shown)
        if echo is not None:
            echo(f"$ {shown}")
        if argv[1:3] == ["-m", "pytest"] and not _importable("pytest"):
            raise ConfigError("pytest is not installed here: `pip install pytest` to run the plugin's own tests")
        try:
            proc = subprocess.run(argv, cwd=folder, env=step_env, capture_output=True, text=True,
                                  timeout=OWN_TESTS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            result.ok, result.output = False, f"{shown} did not finish within {OWN_TESTS_TIMEOUT_S:.0f} s"
            return result
        result.output = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            result.ok = False
            return result
    return result


def _package_json(folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads((folder / "package.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'package.json'}: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def _has_python_tests(folder: Path) -> bool:
    return any(folder.glob("test_*.py")) or any((folder / "tests").glob("test_*.py"))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
