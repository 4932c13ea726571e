"""`tuxpilot event emit` and `tuxpilot events tail`."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError

from tuxpilot.bus import connect as bus
from tuxpilot.cli.common import (
    EXIT_USAGE,
    config_of,
    connect,
    fail,
    out,
    run_async,
)
from tuxpilot.cli.render import follow
from tuxpilot.protocol.models import Event, new_id, now
from tuxpilot.protocol.names import Subjects

emit_app = typer.Typer(help="Inject test events.", no_args_is_help=True)
tail_app = typer.Typer(help="Watch events.", no_args_is_help=True)


@emit_app.command("emit")
def event_emit(
    ctx: typer.Context,
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="category.name, e.g. memory.high")],
    value: Annotated[float | None, typer.Option(help="The reading.")] = None,
    host: Annotated[str | None, typer.Option(help="Host id (default: this host).")] = None,
    severity: Annotated[str, typer.Option(help="info, warning or critical.")] = "warning",
    resource: Annotated[str | None, typer.Option(help="What it is about (a mountpoint, a container).")] = None,
    threshold: Annotated[float | None, typer.Option(help="The threshold crossed.")] = None,
    ttl: Annotated[
        float | None, typer.Option(help="Seconds during which acting on it makes sense (default: monitor.event_ttl_s).")
    ] = None,
) -> None:
    """Publish one test event, as the monitor would."""
    config = config_of(ctx)
    subjects = Subjects.of(config)
    try:
        event = Event.model_validate(
            {
                "id": new_id(),
                "time": now(),
                "type": event_type,
                "host": host or config.host_id,
                "value": value,
                "severity": severity,
                "resource": resource,
                "threshold": threshold,
                # As the monitor's own events: a test event must not be acted on hours later.
                "ttl": ttl if ttl is not None else config.monitor.event_ttl_s,
                "source": "cli",
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid event: {'.'.join(map(str, first['loc']))}: {first['msg']}", EXIT_USAGE)

    async def main() -> None:
        nc = await connect(config)
        await bus.publish_event(nc, subjects, event)
        await nc.flush()
        await nc.close()

    run_async(main())
    out.print_json(event.to_json().decode())


@tail_app.command("tail")
def events_tail(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="category.name with * wildcards, or > for all.")] = ">",
    host: Annotated[str, typer.Option(help="Host id, or * for every host.")] = "*",
    results: Annotated[bool, typer.Option(help="Also show proposals and results.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after this many messages.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each message's JSON.")] = False,
) -> None:
    """Follow events on the bus (Ctrl-C stops)."""
    config = config_of(ctx)
    subjects = Subjects.of(config)

    async def main() -> None:
        nc = await connect(config)
        watch = [subjects.events(pattern, host=host)]
        if results:
            watch += [subjects.proposals(host), subjects.handoffs(host), subjects.results(host)]
        try:
            await follow(nc, watch, count, as_json)
        finally:
            await nc.close()

    run_async(main())
