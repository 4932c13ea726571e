"""{{description}}"""

from __future__ import annotations

from typing import Any

from tuxpilot import ActionError, Context, Event, Plugin, ProposedAction

plugin = Plugin.here(__file__)  # reads plugin.toml beside this file


@plugin.on("{{event}}")  # must be in the manifest's `subscribes`
async def on_event(event: Event, ctx: Context) -> list[ProposedAction]:
    # A proposal, not an action: the host's gate checks it against plugin.toml and its own policy first.
    name = (event.resource or event.host)[:64]
    return [ctx.propose("hello", {"name": name}, reason=f"{event.type} at {event.value}")]


@plugin.action("hello")  # params arrive validated against plugin.toml, defaults filled
def hello(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if params["name"] == "nobody":
        raise ActionError("no one to greet", code="not_found")  # an `error` reply, 404
    ctx.log.info("greeting", name=params["name"])
    return {"text": f"hello {params['name']}"}  # -> {"status": "ok", "data": {...}}


if __name__ == "__main__":
    plugin.run()
