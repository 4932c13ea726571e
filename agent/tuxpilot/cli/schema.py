"""`tuxpilot schema`: the JSON Schemas that are the contract."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from tuxpilot.cli.common import (
    EXIT_USAGE,
    fail,
    out,
)
from tuxpilot.protocol import schemas

app = typer.Typer(help="The JSON Schemas that are the contract with plugins.", no_args_is_help=True)


@app.command("list")
def schema_list() -> None:
    """The schemas TuxPilot ships."""
    table = Table("schema", "$id", "title")
    for name in schemas.SCHEMA_NAMES:
        doc = schemas.load(name)
        table.add_row(name, doc["$id"], doc.get("title", ""))
    out.print(table)


@app.command("show")
def schema_show(name: str) -> None:
    """Print one schema's JSON."""
    try:
        doc = schemas.load(name)
    except KeyError as exc:
        fail(str(exc.args[0]), EXIT_USAGE)
    out.print_json(json.dumps(doc))
