"""`tuxpilot bench`: the benchmark."""

from __future__ import annotations

from typing import Annotated

import typer

from tuxpilot.cli.common import (
    config_of,
)


def bench(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(min=1, help="Events per run (after the warm-up).")] = 20_000,
    in_flight: Annotated[int, typer.Option("--in-flight", min=1, help="Events in flight at once.")] = 64,
    warmup: Annotated[int, typer.Option(min=0, help="Events sent first, not counted.")] = 1_000,
    server: Annotated[str | None, typer.Option(help="Use this NATS server instead of an embedded one.")] = None,
    idle: Annotated[bool, typer.Option(help="Also measure the agent's CPU while idle (30 s).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure the pipeline (gate and a real plugin process) against the bare bus, and the agent's footprint."""
    from tuxpilot import bench as benchmark  # only this command pays for importing it

    config = config_of(ctx)
    raise typer.Exit(
        benchmark.main(config, events=events, in_flight=in_flight, warmup=warmup, server=server, idle=idle,
                       as_json=as_json)
    )
