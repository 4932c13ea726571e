"""slowpoke: a test plugin. Writes `handling-<pid>-<event>` when it starts on an event, waits
`event.value` seconds, proposes `mark`; `mark` appends `<event> <pid>` to `executed`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tuxpilot import Context, Event, Plugin, ProposedAction

plugin = Plugin.here(__file__)


@plugin.on("slow.work")
def work(event: Event, ctx: Context) -> list[ProposedAction]:
    (Path(ctx.config["dir"]) / f"handling-{os.getpid()}-{event.id}").touch()
    time.sleep(event.value or 0)
    return [ctx.propose("mark", {"event_id": event.id})]


@plugin.action("mark")
def mark(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with (Path(ctx.config["dir"]) / "executed").open("a") as out:
        out.write(f"{params['event_id']} {os.getpid()}\n")
    return {"pid": os.getpid()}


if __name__ == "__main__":
    plugin.run()
