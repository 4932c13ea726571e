"""hog: a test plugin. Counts its starts in its working dir; on each of the first `crashes` it writes
the address-space limit it runs under to `limit` and allocates `allocate_mb` (an uncaught MemoryError
under the limit: exit code 1). After that it runs like any plugin."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from tuxpilot import Context, Plugin

plugin = Plugin.here(__file__)


@plugin.on_start
def allocate(ctx: Context) -> None:
    starts = Path("starts")
    count = int(starts.read_text()) + 1 if starts.exists() else 1
    starts.write_text(str(count))
    if count <= ctx.config["crashes"]:
        Path("limit").write_text(str(resource.getrlimit(resource.RLIMIT_AS)[0]))
        hoard = bytearray(ctx.config["allocate_mb"] * 1024 * 1024)
        ctx.log.error("hog.not_limited", bytes=len(hoard))


@plugin.action("ping")
def ping(params: dict[str, Any], ctx: Context) -> dict[str, str]:
    return {"pong": "hog"}


if __name__ == "__main__":
    plugin.run()
