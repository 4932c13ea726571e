"""A container plugin for the tests: `echo` answers its params and what the sandbox looks like from inside
(user, capabilities, no_new_privs, read-only root, cgroup limits, environment); a `boxed.poke` event is
proposed as `echo`. It serves `wipe` whenever the manifest it is given declares it."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

from tuxpilot import Plugin

plugin = Plugin.here(__file__)


def _status(key: str) -> str | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return None


def _first(*paths: str) -> str | None:
    for path in paths:
        try:
            return Path(path).read_text().strip()
        except OSError:
            continue
    return None


def _root_writable() -> bool | str:
    try:
        Path("/probe").write_text("x")
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return True


def _connect(address: str | None) -> str | None:
    """What a TCP connection to host:port gives from inside: "connected", or the errno's name."""
    if not address:
        return None
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return "connected"


@plugin.action("echo")
def echo(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {
        "probe": _connect(params.get("probe")),
        "params": params,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cap_eff": _status("CapEff"),
        "no_new_privs": _status("NoNewPrivs"),
        "root_write": _root_writable(),
        "memory_limit": _first("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
        "pids_limit": _first("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
        "env": sorted(k for k in os.environ if not k.startswith("TUXPILOT_NATS_PASSWORD")),
        "credential": os.environ.get("TUXPILOT_NATS_USER_FILE"),
        "version": plugin.manifest.version,
    }


@plugin.on("boxed.poke")
async def poke(event: Any, ctx: Any) -> list[Any]:
    return [ctx.propose("echo", {"from": event.id}, reason="poked")]


if "wipe" in plugin.manifest.actions:  # only if the manifest in force declares it
    @plugin.action("wipe")
    def wipe(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"wiped": True}


if __name__ == "__main__":
    plugin.run()
