"""tmpclean: a test plugin. On `tmp.full` it proposes `cleanup_tmp`; `cleanup_tmp` removes the files of
its configured dir older than `older_than_s`; `stamp` appends its text to `<dir>/stamps`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tuxpilot import Context, Event, Plugin, ProposedAction

plugin = Plugin.here(__file__)


@plugin.on("tmp.full")
def full(event: Event, ctx: Context) -> list[ProposedAction]:
    return [ctx.propose("cleanup_tmp", {"older_than_s": 0})]


@plugin.action("cleanup_tmp")
def cleanup(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    removed = []
    for path in sorted(Path(ctx.config["dir"]).iterdir()):
        if path.is_file() and path.name != "stamps" and time.time() - path.stat().st_mtime >= params["older_than_s"]:
            path.unlink()
            removed.append(path.name)
    return {"removed": removed}


@plugin.action("stamp")
def stamp(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with (Path(ctx.config["dir"]) / "stamps").open("a") as out:
        out.write(params["text"] + "\n")
    return {"stamped": params["text"]}


if __name__ == "__main__":
    plugin.run()
