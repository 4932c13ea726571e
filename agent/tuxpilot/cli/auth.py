"""`tuxpilot auth`: the NATS users TuxPilot generates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tuxpilot.cli.common import (
    config_of,
    local_plugins,
    out,
)
from tuxpilot.protocol.names import Subjects

app = typer.Typer(help="The NATS authorization TuxPilot generates for its users.", no_args_is_help=True)


@app.command("show")
def auth_show(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """For each generated NATS user, what it may publish and subscribe to."""
    from tuxpilot.bus import auth

    config = config_of(ctx)
    users = auth.users_for(Subjects.of(config), {n: m for n, (_, m) in local_plugins(config).items()})
    if as_json:
        out.print_json(json.dumps(auth.describe(users)))
        return
    for u in users:
        replies = ", may reply to requests" if u.allow_responses else ""
        out.print(f"[bold]{u.name}[/] ({u.role}{replies})")
        out.print("  may publish:   " + "\n                 ".join(u.publish), markup=False)
        out.print("  may subscribe: " + "\n                 ".join(u.subscribe), markup=False)


@app.command("export")
def auth_export(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the server-config snippet.")] = Path(
        "tuxpilot-auth.conf"
    ),
) -> None:
    """Write the `authorization` block for an external nats-server, and each user's credential file."""
    from tuxpilot.bus import auth

    config = config_of(ctx)
    users = auth.users_for(Subjects.of(config), {n: m for n, (_, m) in local_plugins(config).items()})
    hashes = auth.provision(config.state_dir, users, url=config.nats.url)
    output.write_text(auth.server_config(users, hashes))
    out.print(f"wrote {output}: include it in the server config (`include {output.name}`)")
    for u in users:
        out.print(f"  {u.role:8} {u.name}: {auth.credential_file(config.state_dir, u.name)}")
