"""`tuxpilot auth`: the NATS users TuxPilot generates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tuxpilot.cli.common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    config_of,
    fail,
    local_plugins,
    out,
)
from tuxpilot.protocol.errors import BadRequest
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
    files = {u.name: auth.credential_file(config.state_dir, u.name) for u in users}
    if as_json:
        described = auth.describe(users)
        for doc in described:
            doc["credential_file"] = str(files[doc["user"]])
            doc["credential_file_exists"] = files[doc["user"]].is_file()
        out.print_json(json.dumps(described))
        return
    for u in users:
        replies = ", may reply to requests" if u.allow_responses else ""
        out.print(f"[bold]{u.name}[/] ({u.role}{replies})")
        written = "" if files[u.name].is_file() else " (not written yet: `tuxpilot up` or `auth export` writes it)"
        out.print(f"  credentials:   {files[u.name]}{written}", markup=False)
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


@app.command("context")
def auth_context(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="The context's name (default: tuxpilot-<host>).")] = None,
    user: Annotated[str, typer.Option(help="operator, or a local plugin's name (to try what it may do).")] = "operator",
    select: Annotated[bool, typer.Option(help="Make it the `nats` CLI's selected context.")] = False,
) -> None:
    """Write a `nats` CLI context (server URLs, user, password, inbox prefix) so `nats req` and `nats sub`
    work as this host's operator. Selected when asked, or when no context is selected yet."""
    from tuxpilot.bus import auth, natscontext
    from tuxpilot.bus import connect as bus

    config = config_of(ctx)
    name = name or f"tuxpilot-{config.host_id}"
    try:
        path = natscontext.context_file(name)
    except BadRequest as exc:
        fail(exc.message, EXIT_USAGE)
    url = bus.local_url(config)
    if url is None:
        fail("no NATS server: set TUXPILOT_NATS_URL or nats.url, or start `tuxpilot up`", EXIT_UNAVAILABLE)
    if user == "operator":
        credentials = bus.local_nats(config)
    else:
        plugins = {n: m for n, (_, m) in local_plugins(config).items()}
        if user not in plugins:
            fail(f"--user {user!r}: operator, or one of this host's plugins ({', '.join(sorted(plugins))})", EXIT_USAGE)
        found = auth.credential_file(config.state_dir, auth.plugin_user(Subjects.of(config), plugins[user]).name)
        if not found.is_file():
            fail(f"no credential file {found}: `tuxpilot up` writes it", EXIT_USAGE)
        credentials = config.nats.model_copy(update={"user_file": found})
    try:
        doc = natscontext.context_doc(url, credentials, description=natscontext.description(user, config.host_id))
    except (OSError, ValueError) as exc:
        fail(f"cannot read the credentials: {exc}", EXIT_USAGE)
    natscontext.write_private(path, json.dumps(doc, indent=2) + "\n")
    who = f"user {doc['user']}, inbox prefix {doc['inbox_prefix']}" if "user" in doc else "no credentials"
    out.print(f"wrote {path} ({who}, server {url})", markup=False)
    previous = natscontext.selected()
    if select or previous is None or previous == name:
        natscontext.selected_file().write_text(name + "\n")
        out.print(f"selected: `nats req` and `nats sub` now use it (was: {previous or 'none'})", markup=False)
    else:
        out.print(f"select it with: nats context select {name}   (now selected: {previous}; "
                  f"or add --context {name} to each command)", markup=False)
