"""Event throughput into the events stream at different JetStream fsync intervals.

    python benchmarks/fsync.py [--events 20000] [--in-flight 256]

Each run starts its own nats-server (agent.server.NatsServer) with the given `sync_interval`,
creates TuxPilot's streams, and publishes events the way the monitor does (JetStream publish with
Nats-Msg-Id, awaiting the ack), N in flight at a time. Prints events/s and ack latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from tuxpilot.bus.server import NatsServer
from tuxpilot.bus.streams import ensure_streams
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import StreamsConfig


async def run(sync_interval: str, events: int, in_flight: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp), sync_interval=sync_interval).start()
        try:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            subjects = Subjects("tuxpilot", "bench")
            await ensure_streams(js, subjects, StreamsConfig())
            docs = [Event.new("bench.tick", "bench", value=i) for i in range(events)]
            latencies: list[float] = []
            slots = asyncio.Semaphore(in_flight)

            async def one(event: Event) -> None:
                async with slots:
                    t = time.perf_counter()
                    await js.publish(subjects.event(event.type), event.to_json(), headers={"Nats-Msg-Id": event.id})
                    latencies.append((time.perf_counter() - t) * 1000)

            started = time.perf_counter()
            await asyncio.gather(*(one(e) for e in docs))
            elapsed = time.perf_counter() - started
            await nc.close()
        finally:
            server.stop()
    q = statistics.quantiles(latencies, n=100)
    return {"eps": events / elapsed, "p50_ms": q[49], "p99_ms": q[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    print(f"{'sync_interval':>14} {'events/s':>10} {'ack p50 ms':>11} {'ack p99 ms':>11}")
    for interval in ("always", "100ms", "1s", "2m"):
        r = asyncio.run(run(interval, args.events, args.in_flight))
        print(f"{interval:>14} {r['eps']:>10.0f} {r['p50_ms']:>11.2f} {r['p99_ms']:>11.2f}")


if __name__ == "__main__":
    main()
