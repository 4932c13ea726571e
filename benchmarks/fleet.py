"""Gather time of one fleet-wide call over N hosts, through the real fan-out subject and gatherer.

    python benchmarks/fleet.py [--hosts 10 100 1000] [--calls 30] [--connections 8]

SIMULATED HOSTS: each host is a subscription of its own on `tuxpilot.fleet.act.*.*` (no queue group,
as every agent's), spread over a few connections in this one process, with its own host id. It checks
the request's targets exactly as an agent does (`Targets.match`) and answers with its `Tuxpilot-Host`
header, but there is no gate and no plugin behind it: the figures are the bus's fan-out and gathering,
not the per-host work of a real call (`tuxpilot bench` measures the gate). One nats-server on loopback;
`tuxpilot.fleet.gather.gather` collects until every host answered. Prints p50/p99 per N.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from tuxpilot.bus.server import NatsServer
from tuxpilot.fleet.gather import gather
from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.names import HOST_HEADER, Subjects

SUBJECTS = Subjects("tuxpilot", "bench")


async def simulate(nc: Client, host: str) -> None:
    labels = {"role": "web"}

    async def answer(msg: Msg) -> None:
        if Targets.of_headers(msg.headers).match(host, labels):
            await nc.publish(msg.reply, b'{"status":"ok","data":{"pong":true}}', headers={HOST_HEADER: host})

    await nc.subscribe(SUBJECTS.fleet_act("*", "*"), cb=answer)


async def run(url: str, hosts: int, calls: int, connections: int) -> list[float]:
    conns = [await nats.connect(url, pending_size=64 * 1024 * 1024) for _ in range(connections)]
    caller = await nats.connect(url)
    try:
        names = [f"sim-{i:04d}" for i in range(hosts)]
        for i, host in enumerate(names):
            await simulate(conns[i % connections], host)
        for nc in conns:
            await nc.flush()
        expected, times = set(names), []
        for _ in range(calls + 2):  # the first two warm up
            started = time.perf_counter()
            replies = await gather(caller, SUBJECTS, "sysmon", "ping", b"{}", Targets(), deadline_s=10,
                                   expected=expected)
            times.append((time.perf_counter() - started) * 1000)
            assert len(replies) == hosts, f"{len(replies)} of {hosts} answered"
        return times[2:]
    finally:
        for nc in [*conns, caller]:
            await nc.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp)).start()
        try:
            print(f"simulated hosts ({args.connections} connections, one process), {args.calls} calls each")
            for n in args.hosts:
                times = sorted(await run(server.url, n, args.calls, args.connections))
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
                print(f"hosts={n:5d}  gather p50={statistics.median(times):7.1f} ms  p99={p99:7.1f} ms")
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
