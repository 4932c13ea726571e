"""noop: the benchmark's plugin. Each `bench.tick` event is proposed as one `echo` of its sequence
number and value; `echo` answers with its params. Both handlers are coroutines, so neither pays for
a worker thread: what `tuxpilot bench` measures is the SDK and the gate, not the action."""

from __future__ import annotations

from typing import Any

from tuxpilot import Context, Event, Plugin, ProposedAction

plugin = Plugin.here(__file__)


@plugin.on("bench.tick")
async def tick(event: Event, ctx: Context) -> list[ProposedAction]:
    params: dict[str, Any] = {"seq": int(event.data.get("seq", 0))}
    if event.value is not None:
        params["value"] = event.value
    # The event's resource (one per tick) keeps each proposal out of the others' cooldown.
    return [ctx.propose("echo", params, reason="bench tick")]


@plugin.action("echo")
async def echo(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return params


if __name__ == "__main__":
    plugin.run()
