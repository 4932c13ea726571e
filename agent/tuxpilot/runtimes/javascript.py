"""The `javascript` runtime: plugins on the JS SDK (`sdk/js`), run by `node` from the plugin's PATH.

What differs from a Python plugin: the manifest reaches the process as JSON in its environment (no
TOML parser in JS); its npm dependencies are installed from its lockfile before the first start; and
`memory_mb` caps V8's heap (`--max-old-space-size`), while the address space gets headroom on top:
V8 reserves far more address space than it touches, so an `RLIMIT_AS` of `memory_mb` alone would stop
node from starting at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from tuxpilot import __version__
from tuxpilot.protocol import launch
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Launch, Runtime, which

NODE = "node"
# Measured with node 20 on x86-64: under an address-space limit of 640 MiB or less node cannot even
# start (SIGSEGV or SIGTRAP: "Failed to reserve virtual memory for CodeRange"; a hang at 128 MiB); from
# 768 MiB a small script runs. So the address space gets memory_mb (V8's heap cap) plus this much for
# the code range, thread stacks and libraries.
ADDRESS_HEADROOM_MB = 1024
LOCKFILE = "package-lock.json"
# Written into node_modules after an install: which lockfile (and TuxPilot) it was installed from.
INSTALL_STAMP = ".tuxpilot-install.json"
INSTALL_TIMEOUT_S = 600.0
# npm runs with these of the agent's variables only; never the agent's NATS credentials.
NPM_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "NPM_CONFIG_REGISTRY", "NPM_CONFIG_CACHE", "HTTPS_PROXY",
           "HTTP_PROXY", "NO_PROXY")


class InstallError(TuxPilotError):
    code = "unavailable"


class JavaScript(Runtime):
    name: ClassVar[str] = "javascript"

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        if which(NODE, path) is None:
            return f"{NODE} is not on PATH ({path or 'empty'}): install Node.js or add its directory to PATH"
        if (folder / LOCKFILE).is_file() and not installed(folder) and shutil.which("npm") is None:
            return f"its dependencies ({folder / LOCKFILE}) are installed with npm, and npm is not on PATH"
        return super().missing(folder, manifest, path)

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        node = which(NODE, path) or NODE
        flags = [f"--max-old-space-size={limits['memory_mb']}"] if "memory_mb" in limits else []
        return Launch([node, *flags, str(folder / manifest.entry_point)], environment(manifest), rlimits(limits))

    def probe(self, path: str) -> list[str] | None:
        return [which(NODE, path) or NODE, "--version"]

    async def prepare(self, folder: Path, manifest: Manifest, log: Any) -> None:
        await install(folder, log)


def rlimits(limits: dict[str, int]) -> dict[str, int]:
    """The rlimits a node process gets for the plan's limits: the address space with V8's headroom."""
    if "memory_mb" not in limits:
        return dict(limits)
    return {**limits, "memory_mb": limits["memory_mb"] + ADDRESS_HEADROOM_MB}


def environment(manifest: Manifest) -> dict[str, str]:
    """The launch variables only this runtime gets: the manifest, as JSON."""
    return {launch.MANIFEST: json.dumps(manifest.to_doc(), separators=(",", ":"))}


def _stamp(lockfile: Path) -> dict[str, str]:
    return {"lockfile_sha256": hashlib.sha256(lockfile.read_bytes()).hexdigest(), "tuxpilot": __version__}


def installed(folder: Path) -> bool:
    """Whether the plugin's node_modules were installed from its current lockfile (or it has none)."""
    lockfile = folder / LOCKFILE
    if not lockfile.is_file():
        return True
    try:
        return bool(json.loads((folder / "node_modules" / INSTALL_STAMP).read_text()) == _stamp(lockfile))
    except (OSError, ValueError):
        return False


async def install(folder: Path, log: Any) -> bool:
    """`npm ci --omit=dev` in the plugin's folder when its dependencies are not installed from its
    lockfile yet; True when it ran. Lifecycle scripts are not run (`--ignore-scripts`): the agent
    installs as its own user, often root, and a dependency's install script is code nobody reviewed."""
    if installed(folder):
        return False
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError(f"{folder / LOCKFILE} needs `npm` to install the plugin's dependencies, and there is none")
    argv = [npm, "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    log.info("plugin.npm_install", folder=str(folder), command=" ".join(argv[1:]))
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k in NPM_ENV}
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=folder, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), INSTALL_TIMEOUT_S)
    except TimeoutError:
        raise InstallError(f"npm ci in {folder} did not finish within {INSTALL_TIMEOUT_S:.0f} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        last = (out.decode(errors="replace").strip().splitlines() or ["(no output)"])[-3:]
        raise InstallError(f"npm ci in {folder} failed (exit {proc.returncode}): {' | '.join(last)[:500]}")
    (folder / "node_modules" / INSTALL_STAMP).write_text(json.dumps(_stamp(folder / LOCKFILE)))
    log.info("plugin.npm_installed", folder=str(folder), s=round(time.monotonic() - started, 1))
    return True
