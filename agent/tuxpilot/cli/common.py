"""What every command shares: the consoles, exit codes, failing with one line, the config, the connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, NoReturn

import typer
from nats.aio.client import Client
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tuxpilot.agent.config import Config
from tuxpilot.bus import connect as bus
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.settings import NatsConfig, NodeSettings

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3, 4

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr and the exit code; the message is the user's text, never markup."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def table(*columns: str) -> Table:
    """A table of plain text whose words are never cut: piped at 80 columns, a name such as
    `container_stats` stays whole (cells wrap between words; a column is at least as wide as
    its longest word, so a very narrow terminal gets long lines rather than broken names)."""
    grid = Table()
    for column in columns:
        grid.add_column(column, overflow="fold", min_width=len(column))
    return grid


def add_row(grid: Table, *cells: object) -> None:
    """A row of plain text: what a cell shows comes from the bus or the user, never markup."""
    texts = [str(c) for c in cells]
    for column, text in zip(grid.columns, texts, strict=False):
        longest = max((len(word) for word in text.split()), default=0)
        column.min_width = max(column.min_width or 0, longest)
    grid.add_row(*(Text(t) for t in texts))


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


async def connect(config: NodeSettings, *, name: str = "tuxpilot-cli", credentials: NatsConfig | None = None) -> Client:
    """The connection of a command run by hand: the operator's credentials unless others are given; no
    server, or one that does not answer within the connect timeout, is one line and exit 3."""
    url = bus.local_url(config)
    if url is None:
        fail("no NATS server: set TUXPILOT_NATS_URL or nats.url, or start `tuxpilot up`", EXIT_UNAVAILABLE)
    try:
        return await bus.connect(
            credentials or bus.local_nats(config), url, name=name, give_up_after_s=config.nats.connect_timeout_s
        )
    except TuxPilotError as exc:
        fail(exc.message, EXIT_UNAVAILABLE)
    except Exception as exc:
        fail(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}", EXIT_UNAVAILABLE)


def local_plugins(config: Config) -> dict[str, Any]:
    from tuxpilot.agent.app import local_plugins

    try:
        return local_plugins(config)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
