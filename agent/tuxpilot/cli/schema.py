"""`tuxpilot schema`: the JSON Schemas that are the contract."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from tuxpilot.cli.common import (
    EXIT_USAGE,
    add_row,
    config_of,
    fail,
    out,
    table,
)
from tuxpilot.protocol import asyncapi, schemas

app = typer.Typer(help="The JSON Schemas that are the contract with plugins.", no_args_is_help=True)


@app.command("list")
def schema_list() -> None:
    """The schemas TuxPilot ships."""
    grid = table("schema", "$id", "title")
    for name in schemas.SCHEMA_NAMES:
        doc = schemas.load(name)
        add_row(grid, name, doc["$id"], doc.get("title", ""))
    out.print(grid)


@app.command("show")
def schema_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A schema (event, result, …) or an installed plugin's PLUGIN.ACTION.")],
    result: Annotated[bool, typer.Option("--result", help="PLUGIN.ACTION: its result schema, not its params.")] = False,
) -> None:
    """Print one schema's JSON: a contract schema, or the params schema an installed plugin's action takes."""
    if "." in name:
        out.print_json(json.dumps(_action_schema(ctx, name, result=result)))
        return
    try:
        doc = schemas.load(name)
    except KeyError as exc:
        fail(f"{exc.args[0]}; or PLUGIN.ACTION for an action's params", EXIT_USAGE)
    out.print_json(json.dumps(doc))


def _action_schema(ctx: typer.Context, name: str, *, result: bool) -> dict[str, Any]:
    from tuxpilot.agent.app import host_plugins

    plugin, _, action = name.partition(".")
    found = {n: (f.folder, f.manifest) for n, f in host_plugins(config_of(ctx)).plugins.items() if f.manifest}
    if plugin not in found:
        fail(f"no plugin named {plugin!r} installed (installed: {', '.join(sorted(found)) or 'none'})", EXIT_USAGE)
    manifest = found[plugin][1]
    assert manifest is not None
    if action not in manifest.actions:
        fail(f"{plugin} has no action {action!r} (it has: {', '.join(sorted(manifest.actions))})", EXIT_USAGE)
    spec = manifest.actions[action]
    if result:
        if spec.result is None:
            fail(f"{plugin}.{action} declares no result schema", EXIT_USAGE)
        return spec.result
    return spec.params


@app.command("asyncapi")
def schema_asyncapi(
    prefix: Annotated[str, typer.Option(help="The subject prefix the addresses use.")] = "tuxpilot",
) -> None:
    """Print the plugin protocol as an AsyncAPI 3.0 document (JSON), generated from the schemas and subjects."""
    # Plain print: rich would re-flow a long document; this one is meant for tools.
    sys.stdout.write(json.dumps(asyncapi.document(prefix), indent=2) + "\n")
