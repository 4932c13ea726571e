"""`tuxpilot plugin package|verify|publish|search|info|fetch`: plugin packages and the registries they are
published to (the library is `tuxpilot.pdk.package` and `tuxpilot.pdk.registry`; this only renders)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.text import Text

from tuxpilot.agent.config import Config
from tuxpilot.cli.common import EXIT_FAILED, EXIT_USAGE, add_row, config_of, connect, fail, out, run_async, table
from tuxpilot.pdk import deps, package
from tuxpilot.pdk.keys import KeyRing, Signer, TrustStore
from tuxpilot.pdk.registry import Entry, Registry, open_registry, parse_ref
from tuxpilot.pdk.settings import registry_config, signing_keys_dir, trusted_keys_dir
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.protocol.manifest import DANGEROUS, Manifest

T = TypeVar("T")
RegistryOption = Annotated[str | None, typer.Option("--registry", "-r", help="A registry of the host config.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DANGER = "DANGEROUS: granted only when named (plugin install --grant, plugin grant)"


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def plugin_package(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The plugin's folder.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the package is written.")] = Path("."),
    key: Annotated[str | None, typer.Option(help="The signing key (default: your only one).")] = None,
    unsigned: Annotated[bool, typer.Option(help="Do not sign it (hosts refuse it unless allow_unsigned).")] = False,
) -> None:
    """Package the plugin in PATH as a reproducible, signed <name>-<version>.tpkg."""
    config = config_of(ctx)
    signer: Signer | None = None
    try:
        if not unsigned:
            signer = KeyRing(signing_keys_dir(config)).get(key)
        file = package.build(path, out_dir, signer)
        built = package.inspect(file)
    except TuxPilotError as exc:
        fail(f"{exc.message}" + ("" if unsigned or signer else "; or package it --unsigned"), EXIT_USAGE)
    by = f"signed by {signer.name} (key {signer.id})" if signer else "UNSIGNED"
    out.print(f"{file}: {built.name} {built.version}, {len(built.files)} files, {_size(built.size)}; {by}",
              markup=False)
    out.print(f"sha256 {built.sha256}", markup=False)


def _runtime_problem(verified: package.VerifiedPackage) -> str | None:
    """Whether this host can run the package's runtime: unpacked into a temporary folder and asked as the
    plugin host would ask (a wasm module must be valid, node must be there…)."""
    from tuxpilot.runtimes.catalog import RUNTIMES
    from tuxpilot.runtimes.loader import plugin_path

    with tempfile.TemporaryDirectory(prefix="tuxpilot-verify-") as scratch:
        folder = package.unpack(verified, Path(scratch) / verified.name)
        return RUNTIMES[verified.manifest.runtime].missing(folder, verified.manifest, plugin_path())


def _installed(config: Config, name: str) -> dict[str, Manifest]:
    from tuxpilot.agent.app import host_plugins

    return {n: f.manifest for n, f in host_plugins(config).plugins.items() if f.manifest is not None and n != name}


def plugin_verify(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A .tpkg package.")],
    as_json: JsonOption = False,
) -> None:
    """Check a package's integrity and signature against this host's trusted keys; show the permissions it
    asks for (dangerous ones highlighted) and whether this host meets its dependencies."""
    config = config_of(ctx)
    try:
        verified = package.verify(file, TrustStore(trusted_keys_dir(config)),
                                  allow_unsigned=config.marketplace.allow_unsigned)
        problem = _runtime_problem(verified)
    except package.PackageRefused as exc:
        fail(exc.message, EXIT_FAILED)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    m = verified.manifest
    unmet = deps.check(m, installed=_installed(config, m.name), runtimes={m.runtime: problem})
    if as_json:
        out.print_json(json.dumps({
            "name": m.name, "version": m.version, "sha256": verified.sha256, "signed": verified.signed,
            "trusted": verified.trusted, "publisher": verified.publisher, "publisher_name": verified.publisher_name,
            "files": [f.to_doc() for f in verified.files],
            "permissions": [{"name": p.value, "dangerous": p in DANGEROUS} for p in m.permissions],
            "unmet": unmet,
        }))
        return
    out.print(f"{m.name} {m.version} ({m.runtime}, {m.category}): {m.description}", markup=False)
    unpacked = sum(f.size for f in verified.files)
    out.print(f"{file.name}: sha256 {verified.sha256}; {len(verified.files)} files, {_size(unpacked)} unpacked",
              markup=False)
    if verified.trusted:
        out.print(f"publisher: {verified.publisher_name} (key {verified.publisher}), trusted here", markup=False)
    elif verified.signed:
        out.print(Text(f"publisher: claims {verified.publisher_name!r} (key {verified.publisher}), NOT trusted "
                       "here; accepted because marketplace.allow_unsigned is on", style="bold yellow"))
    else:
        out.print(Text("publisher: none (unsigned); accepted because marketplace.allow_unsigned is on",
                       style="bold yellow"))
    out.print("permissions:" if m.permissions else "permissions: none", markup=False)
    for p in m.permissions:
        line = Text(f"  {p.value}")
        if p in DANGEROUS:
            line.append(f"  {DANGER}", style="bold red")
        out.print(line)
    if unmet:
        out.print(Text("this host does not meet:", style="bold red"))
        for u in unmet:
            out.print(f"  {u}", markup=False)
    else:
        out.print("dependencies: met on this host", markup=False)
    out.print(Text("verified", style="bold green"))


def _on_registry(config: Config, name: str | None, work: Callable[[Registry], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            chosen, settings = registry_config(config, name)
        except ConfigError as exc:
            fail(exc.message, EXIT_USAGE)
        nc = None if settings.path is not None else await connect(config)
        try:
            async with open_registry(config, chosen, nc=nc) as registry:
                return await work(registry)
        finally:
            if nc is not None:
                await nc.close()

    result: T = run_async(main())
    return result


def _entry_row(e: Entry) -> list[str]:
    by = f"{e.publisher_name} ({e.publisher})" if e.publisher else "unsigned"
    return [f"{e.name}\n{e.version}", f"{e.category}\n{e.runtime}", e.description, by]


def plugin_publish(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A .tpkg package.")],
    registry: RegistryOption = None,
) -> None:
    """Publish a package to a registry (the host config's default one unless --registry names another)."""
    config = config_of(ctx)

    async def work(reg: Registry) -> tuple[Registry, Entry]:
        return reg, await reg.publish(file)

    reg, entry = _on_registry(config, registry, work)
    by = f"signed by {entry.publisher_name} (key {entry.publisher})" if entry.publisher else "unsigned"
    out.print(f"published {entry.ref} to {reg.name} ({reg.where}); {by}; sha256 {entry.sha256}", markup=False)


def plugin_search(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="Words to find in names, descriptions and categories.")] = "",
    registry: RegistryOption = None,
    as_json: JsonOption = False,
) -> None:
    """Search a registry: the newest version of each plugin whose name, description or category has every word."""
    config = config_of(ctx)

    async def work(reg: Registry) -> list[Entry]:
        return await reg.search(query)

    found = _on_registry(config, registry, work)
    if as_json:
        out.print_json(json.dumps([e.to_doc() for e in found]))
        return
    if not found:
        out.print(f"nothing matches {query!r}", markup=False)
        raise typer.Exit(EXIT_FAILED)
    grid = table("plugin", "kind", "description", "publisher")
    for e in found:
        add_row(grid, *_entry_row(e))
    out.print(grid)


def plugin_info(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]")],
    registry: RegistryOption = None,
    as_json: JsonOption = False,
) -> None:
    """One plugin in a registry: its newest version (or VERSION), what it asks for, and every version published."""
    config = config_of(ctx)
    name, version = parse_ref(ref)

    async def work(reg: Registry) -> tuple[Entry, list[Entry]]:
        return await reg.info(name, version), await reg.entries(name)

    entry, versions = _on_registry(config, registry, work)
    if as_json:
        out.print_json(json.dumps({**entry.to_doc(), "versions": [e.version for e in versions]}))
        return
    out.print(f"{entry.ref} ({entry.runtime}, {entry.category}): {entry.description}", markup=False)
    by = f"{entry.publisher_name} (key {entry.publisher}; trust decided when installed)" if entry.publisher else \
        "unsigned"
    out.print(f"publisher: {by}", markup=False)
    out.print(f"published {entry.published}; {_size(entry.size)}; sha256 {entry.sha256}; api_version "
              f"{entry.api_version}", markup=False)
    out.print("permissions:" if entry.permissions else "permissions: none", markup=False)
    for p in entry.permissions:
        line = Text(f"  {p}")
        if p in entry.dangerous:
            line.append(f"  {DANGER}", style="bold red")
        out.print(line)
    if entry.dependencies:
        out.print("dependencies:", markup=False)
    for d in entry.dependencies:
        out.print(f"  needs {d.get('kind') or 'system'} {d['name']} {d.get('version') or ''}".rstrip(), markup=False)
    out.print(f"versions: {', '.join(e.version for e in versions)}", markup=False)


def plugin_fetch(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the package is written.")] = Path("."),
    registry: RegistryOption = None,
) -> None:
    """Download a package from a registry (checked against its index entry; verify it before trusting it)."""
    config = config_of(ctx)
    name, version = parse_ref(ref)

    async def work(reg: Registry) -> Path:
        return await reg.fetch(name, version, out_dir)

    path = _on_registry(config, registry, work)
    out.print(str(path), markup=False)

