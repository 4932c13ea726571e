"""`tuxpilot status`: the bus, the streams, the plugins."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from tuxpilot.cli.common import (
    add_row,
    config_of,
    connect,
    out,
    run_async,
    table,
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
        "[green]connected[/] to " + escape(
            f"{state['url']} ({server['name']}, nats-server {server['version']}, "
            f"JetStream {'on' if server['jetstream'] else 'off'}), round trip {state['rtt_ms']:.1f} ms"
        )
    )
    grid = table("stream", "messages", "bytes")
    for name, figures in state["streams"].items():
        add_row(grid, name, str(figures.get("messages", "-")), str(figures.get("bytes", figures.get("error", ""))))
    out.print(grid)
    grid = table("consumer", "stream", "pending", "ack pending", "redelivered")
    for c in state["consumers"]:
        add_row(grid, c["name"], c["stream"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"]))
    out.print(grid)
    grid = table("plugin (host.name)", "version", "state", "running instances", "running as")
    states = state.get("plugin_states", {})
    for key in sorted({*state["registered"], *states}):
        host, name = key.split(".", 1)
        instances = [r for r in state["running"] if r["plugin"] == name and r["host"] == host]
        users = sorted({str(r.get("user") or "?") for r in instances})
        add_row(grid, key, str(state["registered"].get(key) or "-"), describe_state(states.get(key)),
                str(len(instances)), ", ".join(users))
    out.print(grid)
    for fake in state.get("impostors", []):
        out.print(f"impostor: an instance ({fake['id']}) claims to be {fake['plugin']} on {fake['host']} "
                  f"(pid {fake['pid']}, user {fake['user']}) but does not answer as that plugin's NATS user: "
                  "not counted", markup=False)


def describe_state(doc: dict[str, Any] | None) -> str:
    """A plugin's state as its agent published it, in a few words (plain text)."""
    if doc is None:
        return "-"
    kind = doc["state"]
    exit_ = doc.get("last_exit")
    last = ""
    if exit_ and exit_.get("signal"):
        last = f"; last exit: signal {exit_['signal']}"
    elif exit_:
        last = f"; last exit: code {exit_.get('exit_code')}"
    if kind in ("not_runnable", "refused"):
        return f"not runnable: {doc.get('reason')}"
    if kind == "crash_loop":
        return f"crash loop: {doc.get('reason')}{last}"
    if kind == "exited":
        return f"exited{last}"
    return str(kind)
