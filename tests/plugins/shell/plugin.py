"""shell: a test plugin for ctx.run_command. `echo` (system_access) echoes its args; `peek`
(filesystem_read) tries the same and must be refused."""

from __future__ import annotations

from typing import Any

from tuxpilot import Context, Plugin

plugin = Plugin.here(__file__)


@plugin.action("echo")
async def echo(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return (await ctx.run_command(["echo", *params["args"]])).to_doc()


@plugin.action("peek")
async def peek(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return (await ctx.run_command(["echo", "not allowed here"])).to_doc()


if __name__ == "__main__":
    plugin.run()
