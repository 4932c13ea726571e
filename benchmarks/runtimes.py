"""Per-call latency and memory of the same echo action served by a Python plugin process and by a wasm
plugin process (a WAT guest of TuxPilot's ABI, a fresh instance per call), each started as the host
starts it, requested over a real nats-server on the plugin's own endpoint:

    .venv/bin/python benchmarks/runtimes.py [N]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tuxpilot.bus.server import NatsServer  # noqa: E402
from tuxpilot.protocol.models import new_id  # noqa: E402
from tuxpilot.protocol.names import ACTION_ID_HEADER, Subjects  # noqa: E402

from tests.wasm import guests  # noqa: E402

MANIFEST = """name = "{name}"
version = "1.0.0"
description = "benchmark"
category = "development"
runtime = "{runtime}"
entry_point = "{entry}"
api_version = "1"
[actions.echo]
timeout_s = 10
"""
PYTHON_ENTRY = """from tuxpilot import Plugin
plugin = Plugin.here(__file__)
@plugin.action("echo")
async def echo(params, ctx):
    return params
"""


def make(base: Path, name: str, runtime: str) -> Path:
    folder = base / name
    folder.mkdir(parents=True)
    entry = "plugin.py" if runtime == "python" else "guest.wasm"
    (folder / "plugin.toml").write_text(MANIFEST.format(name=name, runtime=runtime, entry=entry))
    if runtime == "python":
        (folder / entry).write_text(PYTHON_ENTRY)
    else:
        shutil.move(guests.build("echo", folder), folder / entry)
    return folder


async def measure(url: str, subjects: Subjects, name: str, pid: int, n: int) -> tuple[float, float, float]:
    nc = await nats.connect(url)
    subject = (getattr(subjects, "exec", None) or subjects.act)(name, "echo")
    body = json.dumps({"text": "hello"}).encode()
    for _ in range(200):
        try:
            await nc.request(subject, body, timeout=1, headers={ACTION_ID_HEADER: new_id()})
            break
        except Exception:
            await asyncio.sleep(0.1)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await nc.request(subject, body, timeout=10, headers={ACTION_ID_HEADER: new_id()})
        times.append((time.perf_counter() - started) * 1e6)
    await nc.close()
    rss = psutil.Process(pid).memory_info().rss / 2**20
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1], rss


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = NatsServer(base / "nats").start()
        subjects = Subjects("tuxpilot", "bench-host")
        env = {**os.environ, "TUXPILOT_NATS_URL": server.url, "TUXPILOT_HOST_ID": "bench-host",
               "TUXPILOT_STATE_DIR": str(base / "state"), "TUXPILOT_LOG_LEVEL": "warning"}
        rows = []
        try:
            for runtime, module in (("python", "tuxpilot.sdk.process"), ("wasm", "tuxpilot.sdk.wasm")):
                name = f"bench-{runtime}"
                folder = make(base / "plugins", name, runtime)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", module, str(folder), env=env,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                try:
                    rows.append((runtime, *await measure(server.url, subjects, name, proc.pid, n)))
                finally:
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 10)
        finally:
            server.stop()
    print(f"{'runtime':10} {'p50 us':>9} {'p99 us':>9} {'RSS MiB':>9}   ({n} requests each, one at a time)")
    for runtime, p50, p99, rss in rows:
        print(f"{runtime:10} {p50:9.0f} {p99:9.0f} {rss:9.1f}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
