"""hello: the smallest plugin that reacts to an event and serves an action."""

from typing import Any

from tuxpilot import Plugin

plugin = Plugin.here(__file__)


@plugin.on("demo.ping")
async def pinged(event: Any, ctx: Any) -> Any:
    return [ctx.propose("greet", {"name": event.resource or "world"}, reason="pinged")]


@plugin.action("greet")
def greet(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"greeting": f"hello, {params['name']}"}


if __name__ == "__main__":
    plugin.run()
