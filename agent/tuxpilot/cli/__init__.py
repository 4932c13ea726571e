"""The `tuxpilot` command line: parses, calls the library, renders. No logic lives only here; one module
per command group, rendering in `render`, what they share in `common`.

Exit codes: 0 done, 1 the action or command failed, 2 bad usage or config, 3 no server or no
responders, 4 timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuxpilot.agent.config import load_config
from tuxpilot.cli import audit, auth, automation, bench, call, daemon, events, fleet, key, plugin, schema, status
from tuxpilot.cli.common import EXIT_USAGE, fail
from tuxpilot.log import setup as setup_logging
from tuxpilot.protocol.errors import ConfigError

app = typer.Typer(help="TuxPilot: event-driven automation for Linux fleets on NATS.", no_args_is_help=True)
app.add_typer(plugin.app, name="plugin")
app.add_typer(events.emit_app, name="event")
app.add_typer(events.tail_app, name="events")
app.add_typer(schema.app, name="schema")
app.add_typer(auth.app, name="auth")
app.add_typer(fleet.app, name="fleet")
app.add_typer(key.app, name="key")
app.add_typer(automation.rules_app, name="rules")
app.add_typer(automation.schedule_app, name="schedule")
for command in (daemon.up, daemon.agent, call.call, status.status, audit.audit, bench.bench, automation.approvals,
                automation.approve, automation.deny):
    app.command()(command)


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config file (default: $TUXPILOT_CONFIG).")
    ] = None,
) -> None:
    try:
        ctx.obj = load_config(config)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    setup_logging(ctx.obj.log.level, ctx.obj.log.format)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
