"""What every command shares: the consoles, exit codes, failing with one line, the config, the connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, NoReturn

import typer
from nats.aio.client import Client
from rich.console import Console

from tuxpilot.agent.config import Config
from tuxpilot.bus import connect as bus
from tuxpilot.protocol.errors import ConfigError, TuxPilotError

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3, 4

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def config_of(ctx: typer.Context) -> Config:
    config: Config = ctx.obj
    return config


def run_async(coro: Awaitable[Any]) -> Any:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    except TuxPilotError as exc:
        codes = {"unavailable": EXIT_UNAVAILABLE, "bad_request": EXIT_USAGE}
        fail(exc.message, codes.get(exc.code, EXIT_FAILED))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (OSError, ConnectionError) as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_UNAVAILABLE)


async def connect(config: Config) -> Client:
    url = bus.local_url(config)
    if url is None:
        fail("no NATS server: set TUXPILOT_NATS_URL or nats.url, or start `tuxpilot up`", EXIT_UNAVAILABLE)
    try:
        return await bus.connect(bus.local_nats(config), url, name="tuxpilot-cli")
    except Exception as exc:
        fail(f"cannot connect to {url}: {exc}", EXIT_UNAVAILABLE)


def local_plugins(config: Config) -> dict[str, Any]:
    from tuxpilot.agent.app import local_plugins

    try:
        return local_plugins(config)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
