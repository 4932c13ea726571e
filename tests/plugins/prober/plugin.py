"""Attacks another process with what one plugin's user can do; reports what worked."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

from tuxpilot import Context, Plugin

plugin = Plugin.here(__file__)
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WALL = 0x40000000  # waitpid's __WALL: a tracee that is not our child


def _outcome(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@plugin.action("attack")
def attack(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    pid = params["pid"]
    done: dict[str, Any] = {"uid": os.getuid()}
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        done["ptrace"] = "ok"
        os.waitpid(pid, WALL)
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    else:
        done["ptrace"] = errno.errorcode.get(ctypes.get_errno(), "?")
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            maps = Path(f"/proc/{pid}/maps").read_text().split("\n")[0]
            start = int(maps.split("-")[0], 16)
            mem.seek(start)
            done["mem"] = f"ok: read {len(mem.read(4096))} bytes"
    except OSError as exc:
        done["mem"] = _outcome(exc)
    if "read" in params:
        try:
            with open(params["read"], "rb") as f:
                done["read"] = f"ok: {len(f.read())} bytes"
        except OSError as exc:
            done["read"] = _outcome(exc)
    try:
        os.kill(pid, params["signal"])
        done["kill"] = "ok"
    except OSError as exc:
        done["kill"] = _outcome(exc)
    return done


if __name__ == "__main__":
    plugin.run()
