"""The JavaScript SDK beside the Python one: event→proposal latency, actions/s, RSS and idle CPU.

    python benchmarks/js.py [--events 2000] [--in-flight 8] [--actions 5000] [--idle-s 30]

One nats-server; for each plugin in turn (the Python `noop`, its JavaScript twin
`benchmarks/jsnoop`, and the `prometheus` plugin for its footprint only), the events stream is
purged, the plugin's durable consumer created as the agent would, and the plugin started as the host
starts it. Then:
- event→proposal: `bench.tick` events published `--in-flight` at a time; each is timed from its
  publish to the plugin's proposal arriving on the plugin's proposal subject;
- actions/s: `echo` requests with an action id, straight to the plugin's endpoint (found in its
  `$SRV.INFO`), 64 in flight;
- RSS and CPU: the process's RSS after the runs, and its CPU over `--idle-s` of idling.
Nothing here is a gate: it is what an SDK costs, measured the same way for both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.aio.client import Client
from tuxpilot.bench import bench_plugin_dir
from tuxpilot.bus import streams
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.manifest import Manifest, builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import ACTION_ID_HEADER, MSG_ID_HEADER, Names, Subjects
from tuxpilot.runtimes import javascript
from tuxpilot.runtimes.host import plugin_command
from tuxpilot.settings import StreamsConfig

HOST = "bench"
SUBJECTS = Subjects("tuxpilot", HOST)
HERE = Path(__file__).resolve().parent


def environment(server: NatsServer, manifest: Manifest, config: dict[str, Any]) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TUXPILOT_CONFIG": os.devnull,
        "TUXPILOT_NATS_URL": server.url,
        "TUXPILOT_HOST_ID": HOST,
        "TUXPILOT_LOG_LEVEL": "info",
        "TUXPILOT_PLUGINS": json.dumps({manifest.name: {"config": config}}),
    }
    if manifest.runtime == "javascript":
        env.update(javascript.environment(manifest))  # what the host adds for this runtime
    return env


async def started(nc: Client, name: str, limit: float = 30) -> str:
    """Wait for the plugin's micro service; the subject its `echo` endpoint serves."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = json.loads((await nc.request(f"$SRV.INFO.{name}", b"", timeout=0.5)).data)
            for endpoint in info["endpoints"]:
                if endpoint["name"] == "echo" or name == "prometheus":
                    return str(endpoint["subject"])
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{name} did not start")


async def proposals(nc: Client, name: str, events: int, in_flight: int) -> list[float]:
    """Latency (ms) from each event's publish to its proposal, `in_flight` events outstanding."""
    js = nc.jetstream()
    sent: dict[str, float] = {}
    waiting: dict[str, asyncio.Future[None]] = {}
    latencies: list[float] = []

    async def on_proposal(msg: Any) -> None:
        doc = json.loads(msg.data)
        t = sent.pop(doc["event_id"], None)
        if t is not None:
            latencies.append((time.perf_counter() - t) * 1000)
            fut = waiting.pop(doc["event_id"], None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    sub = await nc.subscribe("tuxpilot.proposal.>", cb=on_proposal)
    slots = asyncio.Semaphore(in_flight)
    loop = asyncio.get_running_loop()

    async def one(seq: int) -> None:
        async with slots:
            event = Event.new("bench.tick", HOST, value=float(seq), data={"seq": seq}, resource=f"tick-{seq}")
            done: asyncio.Future[None] = loop.create_future()
            waiting[event.id] = done
            sent[event.id] = time.perf_counter()
            await js.publish(SUBJECTS.event(event.type), event.to_json(), headers={MSG_ID_HEADER: event.id})
            await asyncio.wait_for(done, 30)

    await asyncio.gather(*(one(i) for i in range(events)))
    await sub.unsubscribe()
    return latencies


async def actions(nc: Client, subject: str, count: int, in_flight: int = 64) -> float:
    slots = asyncio.Semaphore(in_flight)

    async def one(seq: int) -> None:
        async with slots:
            reply = await nc.request(subject, json.dumps({"seq": seq}).encode(), timeout=10,
                                     headers={ACTION_ID_HEADER: uuid.uuid4().hex})
            assert b'"ok"' in reply.data, reply.data

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return count / (time.perf_counter() - t)


async def measure(server: NatsServer, folder: Path, args: argparse.Namespace, *, pipeline: bool) -> dict[str, Any]:
    manifest = load_manifest(folder)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    names = Names.of(SUBJECTS)
    await js.purge_stream(names.events)
    await streams.create_plugin_consumer(js, manifest, SUBJECTS, StreamsConfig())
    config = {"port": 0} if manifest.name == "prometheus" else {}
    log = os.open(Path(args.logs) / f"{manifest.name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    proc = await asyncio.create_subprocess_exec(
        *plugin_command(folder, manifest), env=environment(server, manifest, config),
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    figures: dict[str, Any] = {"plugin": manifest.name, "runtime": manifest.runtime}
    try:
        t = time.perf_counter()
        subject = await started(nc, manifest.name)
        figures["start_s"] = round(time.perf_counter() - t, 2)
        if pipeline:
            await proposals(nc, manifest.name, min(200, args.events), args.in_flight)  # warm-up
            lat = await proposals(nc, manifest.name, args.events, args.in_flight)
            q = statistics.quantiles(lat, n=100)
            figures.update(p50_ms=round(q[49], 2), p99_ms=round(q[98], 2))
            await actions(nc, subject, min(500, args.actions))  # warm-up
            figures["actions_per_s"] = round(await actions(nc, subject, args.actions))
        await asyncio.sleep(2)
        p = psutil.Process(proc.pid)
        figures["rss_mb"] = round(p.memory_info().rss / 2**20, 1)
        before = p.cpu_times()
        await asyncio.sleep(args.idle_s)
        after = p.cpu_times()
        busy = (after.user + after.system) - (before.user + before.system)
        figures["idle_cpu_pct"] = round(100 * busy / args.idle_s, 3)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        os.close(log)
        await js.delete_consumer(names.events, f"{manifest.name}-{HOST}")
        await nc.close()
    return figures


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        args.logs = args.logs or tmp
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            nc = await nats.connect(server.url)
            await streams.ensure_streams(nc.jetstream(), SUBJECTS, StreamsConfig())
            await nc.close()
            rows = [
                await measure(server, bench_plugin_dir(), args, pipeline=True),
                await measure(server, HERE / "jsnoop", args, pipeline=True),
            ]
            if (builtin_dir() / "prometheus" / "node_modules").is_dir():
                rows.append(await measure(server, builtin_dir() / "prometheus", args, pipeline=False))
            return rows
        finally:
            server.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--actions", type=int, default=5000)
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--logs", default="", help="keep the plugins' logs in this folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(main(args))
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'plugin':<11} {'runtime':<11} {'start s':>7} {'ev→prop p50 ms':>15} {'p99 ms':>7} "
          f"{'actions/s':>9} {'RSS MB':>7} {'idle CPU %':>10}")
    for r in rows:
        print(f"{r['plugin']:<11} {r['runtime']:<11} {r['start_s']:>7} {r.get('p50_ms', '-'):>15} "
              f"{r.get('p99_ms', '-'):>7} {r.get('actions_per_s', '-'):>9} {r['rss_mb']:>7} {r['idle_cpu_pct']:>10}")


if __name__ == "__main__":
    sys.exit(cli())
