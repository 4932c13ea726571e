"""`tuxpilot call`: one action on one host, as an operator."""

from __future__ import annotations

from typing import Annotated

import typer
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tuxpilot.bus.registry import open_bucket
from tuxpilot.cli.common import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    config_of,
    connect,
    fail,
    out,
    run_async,
)
from tuxpilot.protocol.names import Subjects, registry_key
from tuxpilot.protocol.registry import RegistryEntry


def call(
    ctx: typer.Context,
    host: str,
    plugin: str,
    action: str,
    params: Annotated[str, typer.Argument(help="JSON object of params.")] = "{}",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 10.0,
) -> None:
    """Call an action through the host's gate, checked and audited like `nats req tuxpilot.act.HOST.PLUGIN.ACTION`."""
    config = config_of(ctx)
    subjects = Subjects.of(config)
    if any(c in token for token in (host, plugin, action) for c in "*>. "):
        fail(f"{host} {plugin} {action}: a call names one host, plugin and action (NATS does not fan a "
             "request out to a wildcard subject; calls to every host are not built yet)", EXIT_USAGE)

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


async def _actions_of(nc: Client, subjects: Subjects, host: str, plugin: str) -> list[str]:
    try:
        kv = await open_bucket(nc.jetstream(), subjects)
        entry = await kv.get(registry_key(host, plugin))
        return sorted(RegistryEntry.from_json(entry.value or b"").manifest.actions)
    except Exception:
        return []
