"""Which plugins this host has and which of them it can run: every plugin folder in the plugin dirs, a
broken manifest skipped with its error, one folder per name (a folder named like another is refused
unless the host config picks it), and a runtime this host lacks refused with what is missing."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import MANIFEST_FILE, Manifest, load
from tuxpilot.runtimes.catalog import RUNTIMES
from tuxpilot.runtimes.settings import HostSettings


@dataclass(frozen=True)
class Found:
    """One plugin folder as this host sees it; `problem` says why the host will not run it."""

    name: str  # the manifest's name; the folder's when the manifest is unreadable
    folder: Path
    manifest: Manifest | None
    builtin: bool = False
    problem: str | None = None

    @property
    def runnable(self) -> bool:
        return self.problem is None and self.manifest is not None

    @property
    def runtime(self) -> str | None:
        return self.manifest.runtime if self.manifest is not None else None


@dataclass(frozen=True)
class Installed:
    """`plugins`: one per name, the one the host loads (runnable or not, and why); `skipped`: folders the
    host will not load at all (a broken manifest, a name another folder holds)."""

    plugins: dict[str, Found]
    skipped: list[Found]


def plugin_path() -> str:
    """The PATH a plugin process gets: the agent's own."""
    return os.environ.get("PATH", os.defpath)


def scan(dirs: list[Path], builtin: Path | None = None) -> list[Found]:
    """Every folder holding a plugin.toml under each of `dirs`, in order, with its manifest or its error."""
    found: list[Found] = []
    seen: set[Path] = set()
    for base in dirs:
        if not base.is_dir():
            continue
        # An entry that is itself a plugin folder is that one plugin (operators point at the folder they
        # just wrote as often as at its parent).
        if (base / MANIFEST_FILE).is_file():
            folders = [base]
        else:
            folders = sorted(p for p in base.iterdir() if (p / MANIFEST_FILE).is_file())
        for folder in folders:
            if folder.resolve() in seen:  # a folder listed twice is still one plugin
                continue
            seen.add(folder.resolve())
            is_builtin = builtin is not None and base.resolve() == builtin.resolve()
            try:
                manifest = load(folder)
            except ConfigError as exc:
                found.append(Found(folder.name, folder, None, is_builtin, f"broken manifest: {exc.message}"))
                continue
            found.append(Found(manifest.name, folder, manifest, is_builtin))
    return found


def installed(dirs: list[Path], builtin: Path, settings: HostSettings, path: str | None = None) -> Installed:
    """The plugins of the folders in `dirs` and of the built-in folder, for a host with `settings`."""
    by_name: dict[str, list[Found]] = {}
    skipped: list[Found] = []
    for found in scan([*dirs, builtin], builtin):
        if found.manifest is None:
            skipped.append(found)
        else:
            by_name.setdefault(found.name, []).append(found)
    plugins: dict[str, Found] = {}
    for name, candidates in by_name.items():
        chosen, refused = _choose(name, candidates, settings)
        skipped += refused
        if chosen is not None:
            plugins[name] = _check_runtime(chosen, path if path is not None else plugin_path())
    return Installed(plugins, skipped)


def _choose(name: str, candidates: list[Found], settings: HostSettings) -> tuple[Found | None, list[Found]]:
    """One folder per plugin name. A second folder of the same name would inherit the first one's
    credentials, grants and groups: it is refused unless `[plugins.<name>] folder` names it. Unpicked,
    a built-in wins over a folder in plugin_dirs; two folders in plugin_dirs are both refused."""
    if len(candidates) == 1 and settings.plugin(name).folder is None:
        return candidates[0], []
    picked = settings.plugin(name).folder
    folders = ", ".join(str(c.folder) for c in candidates)
    if picked is not None:
        chosen = next((c for c in candidates if c.folder.resolve() == picked.resolve()), None)
        if chosen is None:
            why = f"plugins.{name}.folder is {picked}, which holds no plugin {name!r} (found: {folders})"
            return None, [replace(c, problem=why) for c in candidates]
    else:
        builtins = [c for c in candidates if c.builtin]
        chosen = builtins[0] if builtins else None
    why = (f"another folder holds a plugin named {name!r} ({folders}); "
           f"set plugins.{name}.folder in the host config to the one that should run")
    return chosen, [replace(c, problem=why) for c in candidates if c is not chosen]


def _check_runtime(found: Found, path: str) -> Found:
    assert found.manifest is not None
    runtime = RUNTIMES[found.manifest.runtime]
    lacking = runtime.missing(found.folder, found.manifest, path)
    if lacking is None:
        return found
    return replace(found, problem=f"runtime {runtime.name} cannot run here: {lacking}")
