"""The plugins this host installed from packages: one folder per plugin version under
`<state dir>/installed/<name>/<version>/`, and the index (`installed/index.json`) that says which version of
each is in force. Only the agent writes here; the plugin host loads each plugin's current folder like a
folder of `plugin_dirs`, and runs it without `run_plugins` naming it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("tuxpilot.installed")

INSTALLED_DIR = "installed"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Record:
    """One installed plugin: the version in force and where its package came from."""

    name: str
    version: str
    sha256: str
    signed: bool
    publisher: str | None  # the signing key's id
    source: str  # "file", or the registry it came from
    installed_at: str
    trusted: bool = True  # signed by a key of the host's trust store (else allowed by marketplace.allow_unsigned)

    def folder(self, state_dir: Path) -> Path:
        return version_dir(state_dir, self.name, self.version)


def root(state_dir: Path) -> Path:
    return state_dir / INSTALLED_DIR


def plugin_dir(state_dir: Path, name: str) -> Path:
    return root(state_dir) / name


def version_dir(state_dir: Path, name: str, version: str) -> Path:
    return plugin_dir(state_dir, name) / version


def read(state_dir: Path) -> dict[str, Record]:
    """The index; empty when nothing was installed. An unreadable index is logged and read as empty, so
    the agent still starts (the folders stay where they are)."""
    path = root(state_dir) / INDEX_FILE
    try:
        doc = json.loads(path.read_text())
        return {name: Record(**entry) for name, entry in doc["plugins"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("installed.index_unreadable", path=str(path), error=f"{type(exc).__name__}: {exc}")
        return {}


def write(state_dir: Path, records: dict[str, Record]) -> None:
    """Replace the index in one rename: a crash leaves the old one or the new one, never half of it."""
    folder = root(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    doc = {"plugins": {name: asdict(r) for name, r in sorted(records.items())}}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{INDEX_FILE}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / INDEX_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folders(state_dir: Path) -> list[Path]:
    """The folder of each installed plugin's version in force, for the plugin loader."""
    return [r.folder(state_dir) for r in read(state_dir).values()]


def names(state_dir: Path) -> list[str]:
    """The installed plugins the host runs: those whose folder is there (one deleted by hand is logged and
    left out rather than stopping the agent from starting)."""
    present = []
    for name, record in sorted(read(state_dir).items()):
        if record.folder(state_dir).is_dir():
            present.append(name)
        else:
            log.error("installed.folder_missing", plugin=name, version=record.version,
                      folder=str(record.folder(state_dir)))
    return present


def seal(folder: Path) -> None:
    """The plugin's files are root's (the agent's) and read-only to everyone else: a plugin cannot change
    its own code, and its user can read and run it. Executable bits are kept for a native entry point."""
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        os.chmod(path, 0o755 if path.is_dir() or mode & 0o100 else 0o644)


def discard(path: Path) -> None:
    """Delete a folder of the installed tree (a version, or a whole plugin)."""
    shutil.rmtree(path, ignore_errors=True)
