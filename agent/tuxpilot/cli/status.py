"""`tuxpilot status`: the bus, the streams, the plugins."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from tuxpilot.cli.common import (
    config_of,
    connect,
    out,
    run_async,
)
from tuxpilot.protocol.names import Subjects


def status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """The connection to the bus, the streams, registered and running plugins, consumer backlogs."""
    from tuxpilot.agent.status import snapshot

    config = config_of(ctx)

    async def main() -> dict[str, Any]:
        nc = await connect(config)
        try:
            return await snapshot(nc, Subjects.of(config))
        finally:
            await nc.close()

    state: dict[str, Any] = run_async(main())
    if as_json:
        out.print_json(json.dumps(state))
        return
    server = state["server"]
    out.print(
        f"[green]connected[/] to {state['url']} ({server['name']}, nats-server {server['version']}, "
        f"JetStream {'on' if server['jetstream'] else 'off'}), round trip {state['rtt_ms']:.1f} ms"
    )
    table = Table("stream", "messages", "bytes")
    for name, figures in state["streams"].items():
        table.add_row(name, str(figures.get("messages", "-")), str(figures.get("bytes", figures.get("error", ""))))
    out.print(table)
    table = Table("consumer", "stream", "pending", "ack pending", "redelivered")
    for c in state["consumers"]:
        table.add_row(c["name"], c["stream"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"]))
    out.print(table)
    table = Table("plugin (host.name)", "version", "running instances", "running as")
    for key, version in sorted(state["registered"].items()):
        host, name = key.split(".", 1)
        instances = [r for r in state["running"] if r["plugin"] == name and r["host"] == host]
        users = sorted({str(r.get("user") or "?") for r in instances})
        table.add_row(key, str(version), str(len(instances)), ", ".join(users))
    out.print(table)
