"""Gather time of one fleet-wide call over N hosts, through the real fan-out subject and gatherer, and the
memory of a real agent per host.

    python benchmarks/fleet.py [--hosts 10 100 1000] [--calls 30] [--connections 8] [--agents 3]

SIMULATED HOSTS: each host is a subscription of its own on `tuxpilot.fleet.act.*.*` (no queue group,
as every agent's), spread over a few connections in this one process, with its own host id. It checks
the request's targets exactly as an agent does (`Targets.match`) and answers with its `Tuxpilot-Host`
header, but there is no gate and no plugin behind it: the figures are the bus's fan-out and gathering,
not the per-host work of a real call (`tuxpilot bench` measures the gate). One nats-server on loopback;
`tuxpilot.fleet.gather.gather` collects until every host answered. Prints p50/p99 per N.

REAL AGENTS (`--agents N`, 0 to skip): N `tuxpilot agent` processes as enrolled hosts of an operator-mode
fleet on one server, each with its host id, minted credentials, state dir and its sysmon plugin process.
Once every one answers a fleet-wide call, prints each agent's and its plugin's RSS and USS (private
memory; the shared pages of Python itself count once per machine, not per host), then the gather time
of real fleet-wide `sysmon.top_processes` calls, each answered by every agent through its gate.
"""

from __future__ import annotations

import argparse
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
from nats.aio.client import Client
from nats.aio.msg import Msg
from tuxpilot.bus.server import NatsServer
from tuxpilot.fleet import admin
from tuxpilot.fleet.gather import gather
from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.names import HOST_HEADER, Subjects

SUBJECTS = Subjects("tuxpilot", "bench")
# The real call: no CPU sampling (its default waits 0.2 s), one process by memory.
CHEAP_CALL = b'{"by": "memory", "n": 1, "sample_s": 0}'


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


def _percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _memory(proc: psutil.Process) -> tuple[float, float]:
    info = proc.memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


async def real_agents(tmp: Path, count: int, calls: int) -> None:
    """N real agents as enrolled hosts: their memory, and real fleet-wide calls answered by all of them."""
    folder = tmp / "fleet"
    admin.init(folder, urls=["nats://127.0.0.1:4222"])
    hosts = [f"host-{i:02d}" for i in range(count)]
    for host in hosts:
        fleet, _ = admin.enroll(folder, host, {"role": "web"})
    server = NatsServer(tmp / "hub", extra_config=admin.operator_block(fleet, tmp / "hub" / "jwt")).start()
    exe = str(Path(sys.executable).parent / "tuxpilot") if (Path(sys.executable).parent / "tuxpilot").exists() \
        else shutil.which("tuxpilot") or "tuxpilot"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for host in hosts:
            env = {**os.environ, "TUXPILOT_CONFIG": os.devnull, "TUXPILOT_NATS_URL": server.url,
                   "TUXPILOT_HOST_ID": host, "TUXPILOT_STATE_DIR": str(tmp / host),
                   "TUXPILOT_FLEET_ENROLLMENT": str(folder / "hosts" / f"{host}.json"),
                   "TUXPILOT_FLEET_LABELS": json.dumps({"role": "web"})}
            procs.append(await asyncio.to_thread(subprocess.Popen, [exe, "agent"], env=env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        caller = await nats.connect(server.url, user_credentials=str(folder / "admin.creds"))
        try:
            expected, started = set(hosts), time.perf_counter()
            while True:  # until every agent and its sysmon answer
                replies = await gather(caller, SUBJECTS, "sysmon", "top_processes", b"{}", Targets(), deadline_s=5,
                                       expected=expected)
                if {r.host for r in replies if r.status == "ok"} == expected:
                    break
                if time.perf_counter() - started > 120:
                    raise SystemExit(f"only {len(replies)} of {count} agents answered within 120 s")
            await asyncio.sleep(5.0)  # settled: caches warm, first beats sent
            rows = []
            for host, proc in zip(hosts, procs, strict=True):
                agent = psutil.Process(proc.pid)
                kids = [_memory(k) for k in agent.children(recursive=True)]
                rows.append((host, *_memory(agent), sum(k[0] for k in kids), sum(k[1] for k in kids)))
            print(f"real agents: {count} enrolled hosts on one server, each an agent process and its sysmon plugin")
            for host, rss, uss, krss, kuss in rows:
                print(f"  {host}: agent RSS {rss:6.1f} MB (private {uss:5.1f} MB)   sysmon RSS {krss:6.1f} MB "
                      f"(private {kuss:5.1f} MB)")
            per_host_uss = statistics.mean(r[2] + r[4] for r in rows)
            per_host_rss = statistics.mean(r[1] + r[3] for r in rows)
            print(f"  per host: RSS {per_host_rss:.1f} MB, private {per_host_uss:.1f} MB (agent + sysmon)")
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                replies = await gather(caller, SUBJECTS, "sysmon", "top_processes", CHEAP_CALL, Targets(),
                                       deadline_s=10, expected=expected)
                times.append((time.perf_counter() - t0) * 1000)
                assert len(replies) == count, f"{len(replies)} of {count} answered"
            p50, p99 = _percentiles(times)
            print(f"  real fleet-wide sysmon.top_processes {CHEAP_CALL.decode()}, {calls} calls: gather "
                  f"p50={p50:.1f} ms  p99={p99:.1f} ms")
        finally:
            await caller.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--agents", type=int, default=3, help="Real agents to measure (0: none).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.agents:
            await real_agents(Path(tmp) / "agents", args.agents, args.calls)
        if not args.hosts:
            return
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
