"""`tuxpilot audit`: the audit trail, filtered."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from tuxpilot.cli.common import (
    EXIT_USAGE,
    add_row,
    config_of,
    connect,
    fail,
    out,
    run_async,
    table,
)
from tuxpilot.protocol.errors import BadRequest
from tuxpilot.protocol.names import Subjects


def audit(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Host id, or * for all.")] = "*",
    plugin: Annotated[str, typer.Option(help="Plugin, or * for all.")] = "*",
    action: Annotated[str, typer.Option(help="Action, or * for all.")] = "*",
    status: Annotated[str | None, typer.Option(help="ok, error, refused, suppressed, dry_run, timeout, …")] = None,
    since: Annotated[str | None, typer.Option(help="30s, 10m, 2h, 1d ago, or an ISO time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (the newest).")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """The audit trail: every gate decision and action outcome, from the audit stream."""
    from tuxpilot.agent import audit as audit_trail

    config = config_of(ctx)
    try:
        audit_trail.check_filters(status)
    except BadRequest as exc:
        fail(exc.message, EXIT_USAGE)

    async def main() -> list[dict[str, Any]]:
        start = audit_trail.parse_since(since) if since else None
        nc = await connect(config)
        try:
            return await audit_trail.read(
                nc, Subjects.of(config), host=host, plugin=plugin, action=action, status=status,
                since=start, limit=limit,
            )
        finally:
            await nc.close()

    records: list[dict[str, Any]] = run_async(main())
    if as_json:
        out.print_json(json.dumps(records))
        return
    grid = table("time", "host", "plugin.action", "status", "reason", "ms", "message")
    for r in records:
        ms = r.get("duration_ms")
        add_row(
            grid, str(r.get("time", ""))[:19], str(r.get("host", "")), f"{r.get('plugin')}.{r.get('action')}",
            str(r.get("status")), str(r.get("reason") or ""), f"{ms:.0f}" if isinstance(ms, int | float) else "",
            str(r.get("message") or "")[:80],
        )
    out.print(grid)
