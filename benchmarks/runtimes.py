"""Per-call latency and memory of the same echo action served by a Python plugin process, by a wasm
plugin process (a WAT guest of TuxPilot's ABI, a fresh instance per call) and by the Python plugin
shipped as an image and run by the container runtime (TuxPilot's image, `images/build.sh`, on the engine
at $DOCKER_HOST, with the runtime's own flags), each started as the host starts it, requested over a real
nats-server on the plugin's own endpoint:

    .venv/bin/python benchmarks/runtimes.py [N]

The container column is skipped, with the reason, when there is no engine or no TuxPilot image.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tuxpilot.bus.server import NatsServer  # noqa: E402
from tuxpilot.protocol.manifest import load as load_manifest  # noqa: E402
from tuxpilot.protocol.models import new_id  # noqa: E402
from tuxpilot.protocol.names import ACTION_ID_HEADER, Subjects  # noqa: E402
from tuxpilot.runtimes.container import SPEC, ContainerSpec, run_spec  # noqa: E402

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


BASE_IMAGE = os.environ.get("TUXPILOT_IMAGE", "tuxpilot:dev")
DOCKERFILE = """ARG BASE
FROM ${BASE}
COPY plugin.toml plugin.py /plugin/
CMD ["python3", "-m", "tuxpilot.sdk.process", "/plugin"]
"""


def start_container(folder: Path, name: str, env: dict[str, str], network: str) -> tuple[object, int]:
    """The Python plugin in `folder` as an image, started as the host starts a container plugin (the
    process standing for it, with the runtime's flags; `network` "none" is the bus through the relay):
    that process and the pid of the plugin's process in the container (docker-init's child)."""
    import docker

    client = docker.from_env()
    (folder / "Dockerfile").write_text(DOCKERFILE)
    tag = f"tuxpilot-{name}:bench"
    client.images.build(path=str(folder), tag=tag, buildargs={"BASE": BASE_IMAGE}, network_mode="none", rm=True)
    manifest = load_manifest(folder).to_doc()
    spec = ContainerSpec(name=f"tuxpilot-{name}", image=tag, user=f"{os.getuid()}:{os.getgid()}", manifest=manifest,
                         limits={"memory_mb": 256, "processes": 64}, network=network)
    standing = subprocess.Popen([sys.executable, "-m", "tuxpilot.runtimes.container_run", str(folder)],
                                env={**env, SPEC: run_spec(spec, env)}, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            container = client.containers.get(spec.name)
            children = psutil.Process(container.attrs["State"]["Pid"]).children()
            if children:
                return standing, children[0].pid
        except (docker.errors.NotFound, psutil.Error):
            pass
        time.sleep(0.1)
    raise RuntimeError("the container's plugin process did not start")


def container_missing() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.images.get(BASE_IMAGE)
    except Exception as exc:
        return f"container: skipped ({type(exc).__name__}: {str(exc)[:120]})"
    return None


async def first_answer(url: str, subjects: Subjects, name: str) -> float:
    """When the plugin first answered its echo (perf_counter)."""
    nc = await nats.connect(url)
    try:
        for _ in range(1000):
            try:
                await nc.request(subjects.exec(name, "echo"), b"{}", timeout=1, headers={ACTION_ID_HEADER: new_id()})
                return time.perf_counter()
            except Exception:
                await asyncio.sleep(0.01)
        raise RuntimeError(f"{name} never answered")
    finally:
        await nc.close()


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
        skipped: str | None = None
        notes: list[str] = []
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
            skipped = container_missing()
            for network in ("none", "host") if skipped is None else ():
                name = f"bench-container-{network}"
                folder = make(base / "plugins", name, "python")
                started = time.perf_counter()
                standing, pid = await asyncio.to_thread(start_container, folder, name, env, network)
                try:
                    ready_s = await first_answer(server.url, subjects, name) - started
                    label = "container" if network == "none" else "container, host network"
                    rows.append((label, *await measure(server.url, subjects, name, pid, n)))
                    mib = psutil.Process(standing.pid).memory_info().rss / 2**20  # type: ignore[attr-defined]
                    notes.append(f"{label}: the process standing for it (docker-py, relay) {mib:.1f} MiB RSS; "
                                 f"first answer {ready_s:.2f} s after its start (image built before)")
                finally:
                    standing.terminate()  # type: ignore[attr-defined]  # it stops and removes the container
                    await asyncio.to_thread(standing.wait, 20)  # type: ignore[attr-defined]
        finally:
            server.stop()
    print(f"{'runtime':26} {'p50 us':>9} {'p99 us':>9} {'RSS MiB':>9}   ({n} requests each, one at a time)")
    for runtime, p50, p99, rss in rows:
        print(f"{runtime:26} {p50:9.0f} {p99:9.0f} {rss:9.1f}")
    for line in [*notes, *([skipped] if skipped else [])]:
        print(line)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
