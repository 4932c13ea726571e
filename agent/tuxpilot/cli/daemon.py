"""`tuxpilot up` and `tuxpilot agent`: the daemon in the foreground."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer

from tuxpilot import __version__
from tuxpilot.agent.app import Agent
from tuxpilot.bus import connect as bus
from tuxpilot.bus import natscontext
from tuxpilot.cli.common import (
    EXIT_UNAVAILABLE,
    config_of,
    fail,
    out,
    run_async,
)
from tuxpilot.cli.render import describe


def up(ctx: typer.Context, quiet: Annotated[bool, typer.Option(help="Do not print the bus traffic.")] = False) -> None:
    """Start nats-server (unless TUXPILOT_NATS_URL is set), the agent and the local plugins; Ctrl-C stops all."""
    config = config_of(ctx)

    async def main() -> None:
        agent = Agent(config, embedded=True)
        ready = asyncio.Event()
        runner = asyncio.create_task(agent.run(ready))
        await asyncio.wait([runner, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            await runner  # start failed: raise its error
            return
        # A new port each start: the `nats` contexts for this host follow it (before the line that says up).
        moved = natscontext.refresh_urls(config.host_id, agent.url) if agent.server is not None else []
        out.print(f"TuxPilot {__version__} up on [bold]{agent.url}[/] as host [bold]{config.host_id}[/]")
        for path in moved:
            out.print(f"nats context {path.stem} now points at {agent.url}", markup=False)
        sys.stdout.flush()
        if not quiet and agent.nc is not None:
            s = agent.subjects
            for subject in (s.events(host=s.host), s.proposals(), s.handoffs(), s.results(s.host)):
                await agent.nc.subscribe(subject, cb=print_msg)
        await runner

    run_async(main())


async def print_msg(msg: Any) -> None:
    out.print(describe(msg.subject, msg.data))
    sys.stdout.flush()


def agent(ctx: typer.Context) -> None:
    """Run the agent (gate, monitor, local plugins) against the configured NATS server."""
    config = config_of(ctx)
    if bus.local_url(config) is None:
        fail("no NATS server: the agent needs one (nats.url, TUXPILOT_NATS_URL); `tuxpilot up` embeds one",
             EXIT_UNAVAILABLE)
    run_async(Agent(config, embedded=False).run())
