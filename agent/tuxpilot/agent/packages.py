"""What the agent asks of the plugin development kit when it installs: a package obtained (sent in the request,
or fetched from a registry), verified against THIS host's trusted keys and unsigned policy, its dependencies
checked against what this host has, and unpacked safely. The kit is imported only when a package comes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuxpilot.agent.config import Config
from tuxpilot.protocol.errors import Conflict
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
    from tuxpilot.pdk.settings import trusted_keys_dir

    return trusted_keys_dir(config)


async def obtain(config: Config, request: Request, incoming: Path,
                 current: Record | None, nc: Any | None = None) -> tuple[VerifiedPackage, str]:
    """The package, verified: the bytes the request carries, or what the registry holds for the name (the
    requested version, else the newest this host's protocol speaks), fetched over `nc`."""
    import asyncio

    from tuxpilot.pdk import deps, keys, package

    if request.package is not None:
        path, source = incoming / PACKAGE_FILE, "file"
        await asyncio.to_thread(path.write_bytes, request.package)
    else:
        from tuxpilot.pdk.registry import open_registry
        from tuxpilot.protocol.manifest import API_VERSIONS

        assert request.name is not None
        async with open_registry(config, request.registry, nc=nc) as registry:
            version = request.version
            if version is None:
                speakable = [e for e in await registry.entries(request.name) if e.api_version in API_VERSIONS]
                if current is not None:  # an update: only a version newer than the one in force
                    newer = [e for e in speakable if deps.version_key(e.version) > deps.version_key(current.version)]
                    if speakable and not newer:
                        raise Conflict(f"{request.name} {current.version} is installed, and registry {registry.name} "
                                       f"has nothing newer that this host can run (newest: {speakable[-1].version})")
                    speakable = newer
                version = speakable[-1].version if speakable else None
            path = await registry.fetch(request.name, version, incoming)
            source = registry.name
    trust = keys.TrustStore(trust_store(config))
    verified = await asyncio.to_thread(package.verify, path, trust, allow_unsigned=config.marketplace.allow_unsigned)
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
