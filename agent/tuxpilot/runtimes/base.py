"""What every runtime tells the plugin host: whether this host can run a plugin of it, how to start one
(argv, environment), what the plugin's user must be able to reach and run, and how the manifest's limits
map onto the process. One module per manifest runtime implements it; `catalog` picks one by name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tuxpilot.protocol.manifest import Manifest

if TYPE_CHECKING:
    from tuxpilot.runtimes.confine import Account

PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Launch:
    """How one plugin process is started."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the plugin's launch environment
    rlimits: dict[str, int] = field(default_factory=dict)  # manifest limits the kernel enforces as rlimits
    # The process runs as the agent's user, not the plugin's: it only stands for the plugin (a container
    # the process starts on the engine, which runs the plugin as the plugin's user).
    as_agent: bool = False


class Runtime:
    """A manifest runtime. The defaults suit a program the kernel runs directly; subclasses say otherwise."""

    name: ClassVar[str]
    # The plugin's user runs on this host and must pass through the state dir to its working dir and
    # credential file; false for a runtime whose plugin gets them mounted (a container).
    on_host: ClassVar[bool] = True

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        """What this host lacks to run the plugin (checked when it is loaded), or None. `path` is the PATH
        the plugin will get."""
        entry = folder / manifest.entry_point
        return None if entry.is_file() else f"its entry point {entry} does not exist"

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        raise NotImplementedError

    async def prepare(self, folder: Path, manifest: Manifest, log: Any) -> None:
        """What must happen once before the plugin's first start (installing its dependencies); raises a
        TuxPilotError saying why the plugin cannot start."""
        return None

    async def install(self, folder: Path, manifest: Manifest, log: Any) -> None:
        """What installing a package does before the plugin's first start: by default what every start does."""
        await self.prepare(folder, manifest, log)

    async def uninstall(self, folder: Path, manifest: Manifest, log: Any) -> None:
        """What an installed version that goes (removed, updated, rolled back) leaves on the host beyond its
        folder, removed."""
        return None

    def needs(self, folder: Path, manifest: Manifest) -> list[tuple[Path, int]]:
        """What the plugin's user must reach, with the access it needs (os.R_OK | os.X_OK …)."""
        return [(folder / manifest.entry_point, os.R_OK), (folder / "plugin.toml", os.R_OK)]

    def probe(self, path: str) -> list[str] | None:
        """A command the plugin's user must be able to run for the runtime to work (asked of the kernel
        once per user), or None."""
        return None


def which(program: str, path: str) -> str | None:
    return shutil.which(program, path=path)


async def run_as(argv: list[str], account: Account, env: dict[str, str]) -> str | None:
    """Run `argv` as `account`: None when it succeeds, else why not (its last line of output)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            user=account.uid, group=account.gid, extra_groups=list(account.groups),
            env=env, cwd="/", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return f"{account.name} cannot run {argv[0]}: {exc.strerror}"
    try:
        _, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
    except TimeoutError:
        return f"{' '.join(argv)} as {account.name} did not finish within {PROBE_TIMEOUT_S:.0f} s"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode == 0:
        return None
    last = (err.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    return f"{account.name} cannot run {' '.join(argv)}: {last[:300]}"


class Unavailable(Runtime):
    """A runtime the manifest schema names but this TuxPilot cannot run yet: refused when the plugin is
    loaded, instead of exec'ing its entry point and crash-looping on EACCES."""

    lacking: ClassVar[str]

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        return self.lacking

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        raise RuntimeError(self.lacking)
