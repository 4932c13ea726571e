"""Where the memory of TuxPilot's processes goes: what `tuxpilot bench` reports as RSS, taken apart.

    .venv/bin/python benchmarks/footprint.py            # both parts below
    .venv/bin/python benchmarks/footprint.py imports    # RSS after each import, as a plugin process imports
    .venv/bin/python benchmarks/footprint.py up         # `tuxpilot up`'s processes, by mapping

`imports` imports, one after another in a fresh interpreter, what a Python plugin process loads
(`python -m tuxpilot.sdk.process`), and prints the RSS after each step. `up` starts `tuxpilot up
--quiet` on a fresh state folder with the default config, and for the agent and each of its children
sums `/proc/PID/smaps` by mapping: each shared library (pages every TuxPilot process maps alike) and
the heap (`[heap]` and anonymous mappings).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# What a plugin process imports, in the order that shows what each layer adds.
PLUGIN_IMPORTS = (
    "psutil", "tuxpilot", "nats", "nats.micro", "pydantic.main", "tuxpilot.protocol.models",
    "tuxpilot.protocol.schemas", "tuxpilot.protocol.manifest", "tuxpilot.sdk.settings", "tuxpilot.sdk.plugin",
    "tuxpilot.sdk.process",
)
SETTLE_S = 2.0
READY_TIMEOUT_S = 30.0

_STEP = """
import importlib, sys, psutil
p = psutil.Process()
print(f"{'python, psutil':32} {p.memory_info().rss / 2**20:6.1f}")
last = p.memory_info().rss
for name in sys.argv[1:]:
    importlib.import_module(name)
    rss = p.memory_info().rss
    print(f"{name:32} {rss / 2**20:6.1f}  +{(rss - last) / 2**20:.1f}")
    last = rss
"""


def imports() -> None:
    print("RSS MB after each import (a fresh interpreter, psutil first to read it):")
    subprocess.run([sys.executable, "-c", _STEP, *PLUGIN_IMPORTS], check=True)


def by_mapping(pid: int) -> collections.Counter[str]:
    """RSS in KiB by mapping: a shared library's file name, or `heap` for [heap] and anonymous memory."""
    found: collections.Counter[str] = collections.Counter()
    where = "heap"
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                path = fields[5] if len(fields) > 5 else ""
                where = "heap" if not path or path in ("[heap]", "[stack]") or path.startswith("[anon") else Path(
                    path).name
            elif fields[0] == "Rss:":
                found[where] += int(fields[1])
    return found


def up() -> None:
    with tempfile.TemporaryDirectory(prefix="tuxpilot-footprint-") as tmp:
        state = Path(tmp)
        (state / "tuxpilot.toml").write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
        env.update(TUXPILOT_STATE_DIR=str(state), TUXPILOT_HOST_ID="footprint",
                   TUXPILOT_CONFIG=str(state / "tuxpilot.toml"))
        proc = subprocess.Popen([sys.executable, "-m", "tuxpilot.cli", "up", "--quiet"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + READY_TIMEOUT_S
            if not proc.stdout.readline() or time.monotonic() > deadline:
                sys.exit("tuxpilot up did not start")
            time.sleep(SETTLE_S)
            agent = psutil.Process(proc.pid)
            for p in (agent, *agent.children(recursive=True)):
                cmd = p.cmdline()
                label = "agent" if p.pid == agent.pid else Path(cmd[-1]).name if "python" in cmd[0] else p.name()
                parts = by_mapping(p.pid)
                total = sum(parts.values())
                top = ", ".join(f"{name} {kib / 1024:.1f}" for name, kib in parts.most_common(6))
                print(f"{label:12} RSS {total / 1024:5.1f} MB: {top}")
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    what = sys.argv[1:2] or ["all"]
    if what[0] in ("imports", "all"):
        imports()
    if what[0] in ("up", "all"):
        up()
