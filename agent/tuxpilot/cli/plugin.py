"""`tuxpilot plugin`: list, grant, revoke, run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tuxpilot.agent.app import plugin_dirs
from tuxpilot.bus.registry import live_instances
from tuxpilot.cli.common import (
    EXIT_USAGE,
    config_of,
    connect,
    fail,
    out,
    run_async,
)
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import discover

app = typer.Typer(help="Plugins: list, run.", no_args_is_help=True)


@app.command("list")
def plugin_list(
    ctx: typer.Context,
    live: Annotated[bool, typer.Option(help="Also ask the bus which instances are running.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The installed plugins (built-in and in plugin_dirs), with their actions and permissions."""
    config = config_of(ctx)
    try:
        found = discover(plugin_dirs(config))
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    running: dict[str, int] = {}
    if live:

        async def ping() -> None:
            nc = await connect(config)
            for inst in await live_instances(nc, config.host_id):
                running[inst["name"]] = running.get(inst["name"], 0) + 1
            await nc.close()

        run_async(ping())
    rows: list[dict[str, Any]] = []
    for name, (folder, m) in sorted(found.items()):
        granted = sorted(p.value for p in config.plugin(name).granted(m))
        rows.append(
            {
                "name": name,
                "version": m.version,
                "category": m.category,
                "runtime": m.runtime,
                "actions": sorted(m.actions),
                "permissions": [p.value for p in m.permissions],
                "granted": granted,
                "path": str(folder),
                **({"running": running.get(name, 0)} if live else {}),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("plugin", "version", "category", "runtime", "actions", "granted", *(["running"] if live else []))
    for r in rows:
        extra = [str(r["running"])] if live else []
        cells = [r["name"], r["version"], r["category"], r["runtime"], ", ".join(r["actions"]), ", ".join(r["granted"])]
        table.add_row(*cells, *extra)
    out.print(table)


def _grant(ctx: typer.Context, name: str, permissions: list[str], *, revoke: bool) -> None:
    from tuxpilot.agent.config import edit_grants
    from tuxpilot.protocol.manifest import Permission
    from tuxpilot.settings import config_path, default_config_path

    config = config_of(ctx)
    found = discover(plugin_dirs(config))
    if name not in found:
        fail(f"no plugin named {name!r} (installed: {', '.join(sorted(found)) or 'none'})", EXIT_USAGE)
    try:
        chosen = [Permission(p) for p in permissions]
    except ValueError as exc:
        fail(f"{exc}; permissions are {', '.join(p.value for p in Permission)}", EXIT_USAGE)
    manifest = found[name][1]
    path = config_path(ctx.find_root().params.get("config")) or default_config_path()
    current = config.plugin(name).granted(manifest)
    try:
        granted = edit_grants(path, manifest, current, add=[] if revoke else chosen, remove=chosen if revoke else [])
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    out.print(f"{name}: granted {', '.join(p.value for p in granted) or 'nothing'} (in {path})")


@app.command("grant")
def plugin_grant(ctx: typer.Context, name: str, permissions: list[str]) -> None:
    """Grant a plugin permissions its manifest asks for (written to the host config; a running agent reloads it)."""
    _grant(ctx, name, permissions, revoke=False)


@app.command("revoke")
def plugin_revoke(ctx: typer.Context, name: str, permissions: list[str]) -> None:
    """Take permissions back from a plugin."""
    _grant(ctx, name, permissions, revoke=True)



@app.command("run")
def plugin_run(ctx: typer.Context, path: Path) -> None:
    """Run the Python plugin in folder PATH against the configured (or local `up`) server."""
    from tuxpilot.sdk.plugin import load_plugin
    from tuxpilot.sdk.settings import PluginProcessSettings

    config = config_of(ctx)
    try:
        plugin = load_plugin(path.resolve())
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    run_async(plugin.main(PluginProcessSettings.of(config)))
