"""What the agent asks of the plugin development kit when it installs: a package obtained (sent in the request,
or fetched from a registry), verified against THIS host's trusted keys and unsigned policy, its dependencies
checked against what this host has, and unpacked safely. The kit is imported only when a package comes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tuxpilot.agent.config import Config
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.catalog import RUNTIMES
from tuxpilot.runtimes.loader import plugin_path

if TYPE_CHECKING:
    from tuxpilot.agent.installed import Record
    from tuxpilot.agent.installer import Request
    from tuxpilot.pdk.package import PackageRefused, VerifiedPackage

PACKAGE_FILE = "package.tpkg"


def refused(message: str) -> PackageRefused:
    from tuxpilot.pdk.package import PackageRefused

    return PackageRefused(message)


def trust_store(config: Config) -> Path:
    return config.state_dir / "keys" / "trusted"


async def obtain(config: Config, request: Request, incoming: Path,
                 current: Record | None) -> tuple[VerifiedPackage, str]:
    """The package, verified: the bytes the request carries, or what the registry holds for the name."""
    import asyncio

    from tuxpilot.pdk import keys, package

    if request.package is not None:
        path, source = incoming / PACKAGE_FILE, "file"
        await asyncio.to_thread(path.write_bytes, request.package)
    else:
        raise refused("installing by name needs a registry, and this host has none configured yet")
    trust = keys.TrustStore(trust_store(config))
    verified = await asyncio.to_thread(package.verify, path, trust, allow_unsigned=False)
    return verified, source


def runtimes_here(folder: Path, manifest: Manifest) -> dict[str, str | None]:
    """Each runtime this host knows: for the plugin's own, None when it can run the plugin unpacked in `folder`
    (its JavaScript dependencies may still be missing if npm is there to install them), else why not."""
    return {name: runtime.missing(folder, manifest, plugin_path()) if name == manifest.runtime else None
            for name, runtime in RUNTIMES.items()}


def check_dependencies(manifest: Manifest, folder: Path, installed: dict[str, Manifest]) -> list[str]:
    """Every unmet requirement of the plugin unpacked in `folder`, on this host with these plugins."""
    from tuxpilot.pdk import deps

    others = {n: m for n, m in installed.items() if n != manifest.name}
    return deps.check(manifest, installed=others, runtimes=runtimes_here(folder, manifest))


def unpack(verified: VerifiedPackage, folder: Path) -> Path:
    from tuxpilot.pdk import package

    return package.unpack(verified, folder)
