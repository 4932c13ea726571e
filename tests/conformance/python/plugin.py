"""The conformance plugin in Python: the behaviour ../plugin.toml describes."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from tuxpilot import ActionError, Context, Event, Plugin, ProposedAction

plugin = Plugin.here(__file__)
runs: Counter[str] = Counter()
deliveries: Counter[str] = Counter()


class Unexpected(Exception):
    """Not a TuxPilot error: what a bug in a handler looks like."""


@plugin.action("echo")
def echo(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return params


@plugin.action("count")
def count(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    runs[params["key"]] += 1
    return {"runs": runs[params["key"]], "key": params["key"]}


@plugin.action("fail")
def fail(params: dict[str, Any], ctx: Context) -> None:
    raise ActionError(params["message"], code=params["code"])


@plugin.action("crash")
def crash(params: dict[str, Any], ctx: Context) -> None:
    raise Unexpected("crashed on request")


@plugin.action("big")
def big(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"blob": "x" * params["bytes"]}


@plugin.on("conformance.*")
async def on_event(event: Event, ctx: Context) -> list[ProposedAction]:
    deliveries[event.id] += 1
    delivery = deliveries[event.id]
    if event.name == "quiet":
        return []
    if event.name == "flaky" and delivery <= int(event.data.get("fail", 0)):
        raise Unexpected(f"failing delivery {delivery} on request")
    if event.name == "hold" and delivery == 1:
        await asyncio.sleep(float(event.data.get("hold_s", 0)))
    return [ctx.propose("echo", {"text": event.id, "n": min(delivery, 10)}, reason=f"delivery {delivery}")]


if __name__ == "__main__":
    plugin.run()
