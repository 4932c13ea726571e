"""`tuxpilot plugin new`: a working plugin folder from the templates shipped in this package.

The templates (`templates/common` for the manifest, `templates/<runtime>` for the code, its test and its
build files) are plain files with `{{key}}` placeholders: a handful of values, no logic, so no template
engine. A JavaScript plugin gets a copy of the SDK in `sdk/` and a lockfile resolved from npm's cache;
a WebAssembly one the C guest header in `include/`: the folder stands alone, so it can be packaged and
installed on a host that has no TuxPilot checkout.
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import API_VERSION, Category
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.resources import shipped

TEMPLATES = Path(__file__).resolve().parent / "templates"
RUNTIMES = ("python", "javascript", "wasm")
CATEGORIES: tuple[str, ...] = get_args(Category)
ENTRY_POINTS = {"python": "plugin.py", "javascript": "plugin.js", "wasm": "plugin.wasm"}
# A wasm guest's memory cap and fuel; the others keep the host's defaults.
LIMITS = {"wasm": "\n[limits]\nmemory_mb = 16   # the guest's memory cap\ncpu_s = 2        # fuel per call\n"}
NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
EVENT = re.compile(r"^([a-z0-9_-]{1,64}|\*)\.([a-z0-9_-]{1,64}|\*)$")
PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
NPM_TIMEOUT_S = 300.0


@dataclass
class Scaffold:
    """What `new` wrote: the folder, its files (relative), and what is left to do by hand, if anything."""

    folder: Path
    runtime: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def new(
    name: str,
    *,
    runtime: str,
    category: str,
    folder: Path,
    event: str = "memory.high",
    description: str | None = None,
    author: str | None = None,
) -> Scaffold:
    """Write plugin `name` into `folder` (which must not exist, or be empty). Raises ConfigError on a bad
    name, runtime, category or event type, or a folder in the way."""
    if not NAME.match(name):
        raise ConfigError(f"plugin name {name!r}: use 1-64 of a-z, 0-9, '_' and '-' (it is a NATS subject token)")
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: `plugin new` writes {', '.join(RUNTIMES)}")
    if category not in CATEGORIES:
        raise ConfigError(f"category {category!r}: one of {', '.join(CATEGORIES)}")
    if not EVENT.match(event):
        raise ConfigError(f"event type {event!r}: `<category>.<name>`, e.g. memory.high or disk.*")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} already exists and is not an empty folder")
    values = {
        "name": name,
        "runtime": runtime,
        "category": category,
        "event": event,
        "description": _one_line(description or f"{name}: handles {event} and serves `hello`"),
        "author": _one_line(author or _author()),
        "entry_point": ENTRY_POINTS[runtime],
        "api_version": API_VERSION,
        "limits": LIMITS.get(runtime, ""),
    }
    folder.mkdir(parents=True, exist_ok=True)
    made = Scaffold(folder.resolve(), runtime)
    for base in (TEMPLATES / "common", TEMPLATES / runtime):
        for source in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            relative = source.relative_to(base)
            # Dot files are stored as `dot-…`: a `.npmrc` or `.gitignore` in the package would act on this repo.
            named = "." + relative.name[4:] if relative.name.startswith("dot-") else relative.name
            target = folder / relative.parent / named
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_render(source.read_text(), values, source))
            shutil.copymode(source, target)
            made.files.append(str(target.relative_to(folder)))
    if runtime == "javascript":
        made.files += _vendor_js_sdk(folder)
        made.notes += _lock(folder)
    elif runtime == "wasm":
        include = folder / "include"
        include.mkdir()
        shutil.copyfile(shipped("guests") / "c" / "tuxpilot_guest.h", include / "tuxpilot_guest.h")
        made.files.append("include/tuxpilot_guest.h")
        made.notes.append("build it with ./build.sh (clang, lld, wasi-libc); `tuxpilot plugin test` builds it too")
    load_manifest(folder)  # the templates must give a manifest this TuxPilot loads
    return made


def _render(text: str, values: dict[str, str], source: Path) -> str:
    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"template {source}: no value for {{{{{key}}}}}")
        return values[key]

    return PLACEHOLDER.sub(fill, text)


def _one_line(text: str) -> str:
    """Safe inside a TOML basic string, a JSON string, and a comment of any of the template languages."""
    return re.sub(r'[\x00-\x1f\x7f"\\]|\*/', " ", text).strip()[:200]


def _author() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _vendor_js_sdk(folder: Path) -> list[str]:
    """A copy of the JavaScript SDK in `sdk/` (its sources and its package.json without dev dependencies),
    which the plugin's package.json names as `file:./sdk`. The SDK is not on the npm registry; a copy
    travels with the plugin (into a package, onto another host) where a path to this installation would not."""
    source = shipped("sdk") / "js"
    target = folder / "sdk"
    shutil.copytree(source / "src", target / "src")
    package = json.loads((source / "package.json").read_text())
    for key in ("devDependencies", "scripts"):
        package.pop(key, None)
    (target / "package.json").write_text(json.dumps(package, indent=2) + "\n")
    return sorted(str(p.relative_to(folder)) for p in target.rglob("*") if p.is_file())


def _lock(folder: Path) -> list[str]:
    """package-lock.json, from npm's cache when it holds the SDK's dependencies (after `npm ci` in sdk/js,
    or any earlier plugin), else from the registry. The host installs from this lockfile (`npm ci`)."""
    npm = shutil.which("npm")
    if npm is None:
        return ["npm is not on PATH: run `npm install --package-lock-only` in the folder to write the lockfile"]
    base = [npm, "install", "--package-lock-only", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    failure = ""
    for extra in (["--offline"], ["--prefer-offline"]):
        try:
            proc = subprocess.run([*base, *extra], cwd=folder, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            failure = f"timed out after {NPM_TIMEOUT_S:.0f} s"
            continue
        if proc.returncode == 0 and (folder / "package-lock.json").is_file():
            return []
        failure = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return [f"npm could not write the lockfile ({failure}): run `npm install --package-lock-only` in the folder"]
