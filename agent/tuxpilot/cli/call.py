"""`tuxpilot call`: one action on one host, as an operator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tuxpilot.agent.config import Config
from tuxpilot.bus.registry import open_bucket
from tuxpilot.cli.common import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_row,
    config_of,
    connect,
    fail,
    out,
    run_async,
    table,
)
from tuxpilot.fleet import admin
from tuxpilot.fleet.gather import gather
from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.names import Subjects, registry_key
from tuxpilot.protocol.registry import RegistryEntry


def call(
    ctx: typer.Context,
    host: str,
    plugin: str,
    action: Annotated[str | None, typer.Argument(help="(With --all/--hosts/--label: the params.)")] = None,
    params: Annotated[str, typer.Argument(help="JSON object of params.")] = "{}",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply (or replies).")] = 10.0,
    all_hosts: Annotated[bool, typer.Option("--all", help="Every host: call PLUGIN ACTION [PARAMS].")] = False,
    hosts: Annotated[str | None, typer.Option("--hosts", help="Host globs, comma-separated: 'web-*,db-1'.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="key=value the hosts must carry.")] = None,
    fleet_dir: Annotated[Path | None, typer.Option(
        "--fleet-dir", envvar="TUXPILOT_FLEET_DIR", help="The fleet's folder: its roster names who did not answer.",
    )] = None,
) -> None:
    """Call an action through the host's gate, checked and audited like `nats req tuxpilot.act.HOST.PLUGIN.ACTION`;
    with --all, --hosts or --label, through every targeted host's gate at once (`tuxpilot.fleet.act.PLUGIN.ACTION`)."""
    config = config_of(ctx)
    subjects = Subjects.of(config)
    if all_hosts or hosts or label:
        # Fleet-wide: the positionals are PLUGIN ACTION [PARAMS].
        _fleet_call(config, subjects, host, plugin, action or "{}", timeout, hosts, label or [], fleet_dir)
        return
    if action is None:
        fail("call HOST PLUGIN ACTION [PARAMS], or --all/--hosts/--label PLUGIN ACTION [PARAMS]", EXIT_USAGE)
    if any(c in token for token in (host, plugin, action) for c in "*>. "):
        fail(f"{host} {plugin} {action}: a call names one host, plugin and action (for several hosts use "
             "--all, --hosts or --label)", EXIT_USAGE)

    async def main() -> int:
        nc = await connect(config)
        try:
            try:
                msg = await nc.request(subjects.act(plugin, action, host), params.encode(), timeout=timeout)
            except NoRespondersError:
                known = await _actions_of(nc, subjects, host, plugin)
                hint = f"; {plugin} on {host} has: {', '.join(known)}" if known else f"; is {plugin} running on {host}?"
                fail(f"no responders for {plugin}.{action} on {host}{hint}", EXIT_UNAVAILABLE)
            except NatsTimeout:
                fail(f"no reply within {timeout} s", EXIT_TIMEOUT)
            out.print_json(msg.data.decode(errors="replace"))
            return EXIT_FAILED if (msg.headers or {}).get("Nats-Service-Error-Code") else 0
        finally:
            await nc.close()

    raise typer.Exit(run_async(main()))


def _fleet_call(config: Config, subjects: Subjects, plugin: str, action: str, params: str, timeout: float,
                hosts: str | None, labels: list[str], fleet_dir: Path | None) -> None:
    if any(c in token for token in (plugin, action) for c in "*>. "):
        fail(f"{plugin} {action}: one plugin and one action", EXIT_USAGE)
    try:
        targets = Targets.parse(hosts, ",".join(labels))
    except TuxPilotError as exc:
        fail(exc.message, EXIT_USAGE)
    enrolled = roster(fleet_dir)
    expected = None if enrolled is None else {h for h, lab in enrolled.items() if targets.match(h, lab)}

    async def main() -> int:
        nc = await connect(config)
        try:
            replies = await gather(nc, subjects, plugin, action, params.encode(), targets, deadline_s=timeout,
                                   expected=expected)
        finally:
            await nc.close()
        grid = table("host", "status", "ms", "data or error")
        for reply in replies:
            add_row(grid, reply.host, reply.status, f"{reply.ms:.0f}", reply.summary)
        out.print(grid)
        answered = {r.host for r in replies}
        if expected is None:
            out.print(f"{len(replies)} host(s) answered within {timeout:g} s (no fleet roster: --fleet-dir names "
                      "who should have)")
            missing: set[str] = set()
        else:
            missing = expected - answered
            out.print(f"{len(replies)} of {len(expected)} targeted host(s) answered"
                      + (f"; no answer from: {', '.join(sorted(missing))}" if missing else ""))
        return EXIT_FAILED if missing or any(r.status != "ok" for r in replies) or not replies else 0

    raise typer.Exit(run_async(main()))


def roster(fleet_dir: Path | None) -> dict[str, dict[str, str]] | None:
    """Enrolled, unrevoked hosts and their labels, from the fleet's folder when it is at hand."""
    folder = fleet_dir or Path("fleet")
    if not (folder / admin.FLEET_FILE).is_file():
        return None
    fleet = admin.load(folder)
    return {h: r.labels for h, r in fleet.hosts.items() if not r.revoked}


async def _actions_of(nc: Client, subjects: Subjects, host: str, plugin: str) -> list[str]:
    try:
        kv = await open_bucket(nc.jetstream(), subjects)
        entry = await kv.get(registry_key(host, plugin))
        return sorted(RegistryEntry.from_json(entry.value or b"").manifest.actions)
    except Exception:
        return []
