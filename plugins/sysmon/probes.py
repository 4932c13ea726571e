"""What sysmon measures, with psutil: plain functions returning JSON-able data, usable without NATS."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

import psutil

_FIELDS = ["pid", "ppid", "name", "username", "cpu_percent", "memory_percent", "memory_info", "cmdline"]
# A process may exit, or turn out to be someone else's, between listing it and reading it.
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)
CMDLINE_MAX = 200
HIGH_PERCENT = 90.0
# A report of an hour at 20 samples a second must still fit in one NATS message.
MAX_ANOMALIES = 100


def _describe(info: dict[str, Any]) -> dict[str, Any]:
    mem = info.get("memory_info")
    return {
        "pid": info["pid"],
        "ppid": info.get("ppid"),
        "name": info.get("name") or "",
        "username": info.get("username"),
        "cmdline": " ".join(info.get("cmdline") or [])[:CMDLINE_MAX],
        "cpu_percent": round(info.get("cpu_percent") or 0.0, 2),
        "memory_percent": round(info.get("memory_percent") or 0.0, 3),
        "rss_bytes": mem.rss if mem else 0,
    }


def processes(sample_s: float = 0.0) -> list[dict[str, Any]]:
    """Every process we may read. CPU percent is measured over `sample_s` seconds (blocking); with 0
    it covers the time since this process last looked (psutil keeps its Process objects), 0 at first."""
    procs = list(psutil.process_iter())
    if sample_s > 0:
        for p in procs:
            with contextlib.suppress(*_GONE):
                p.cpu_percent(None)  # prime: the next call measures from now
        time.sleep(sample_s)
    found = []
    for p in procs:
        try:
            with p.oneshot():
                found.append(_describe(p.as_dict(attrs=_FIELDS)))
        except _GONE:
            continue
    return found


def top_processes(by: str = "cpu", n: int = 10, sample_s: float = 0.2) -> list[dict[str, Any]]:
    """The `n` processes using the most CPU or memory, biggest first (RSS breaks ties)."""
    key = "cpu_percent" if by == "cpu" else "memory_percent"
    return sorted(processes(sample_s), key=lambda p: (p[key], p["rss_bytes"]), reverse=True)[:n]


def process_tree(
    root_pid: int | None = None, max_depth: int = 32, sample_s: float = 0.0
) -> tuple[list[dict[str, Any]], int]:
    """The forest of processes (or the subtree at `root_pid`, empty if there is no such process) and
    how many processes it holds. Nodes deeper than `max_depth` are cut, their parent marked `truncated`."""
    found = {
        p["pid"]: {
            "pid": p["pid"],
            "name": p["name"],
            "username": p["username"],
            "cpu_percent": p["cpu_percent"],
            "memory_percent": p["memory_percent"],
            "children": [],
            "_ppid": p["ppid"],
        }
        for p in processes(sample_s)
    }
    roots = []
    for node in found.values():
        parent = found.get(node.pop("_ppid"))
        if parent is not None and parent is not node:
            parent["children"].append(node)
        else:
            roots.append(node)
    if root_pid is not None:
        roots = [found[root_pid]] if root_pid in found else []

    def trim(node: dict[str, Any], depth: int) -> int:
        if depth >= max_depth and node["children"]:
            node["children"] = []
            node["truncated"] = True
        return 1 + sum(trim(child, depth + 1) for child in node["children"])

    return roots, sum(trim(r, 1) for r in roots)


def _sample(previous: tuple[Any, Any, float] | None) -> tuple[dict[str, float], tuple[Any, Any, float]]:
    """CPU and memory percent now, and disk and network bytes per second since `previous`."""
    disk, net, now = psutil.disk_io_counters(), psutil.net_io_counters(), time.monotonic()
    figures = {"cpu_percent": psutil.cpu_percent(None), "memory_percent": psutil.virtual_memory().percent}
    if previous is not None:
        pdisk, pnet, then = previous
        span = max(now - then, 1e-6)
        # Either may be None where the machine has no disks or no network (containers, sandboxes).
        figures["disk_read_bps"] = (disk.read_bytes - pdisk.read_bytes) / span if disk and pdisk else 0.0
        figures["disk_write_bps"] = (disk.write_bytes - pdisk.write_bytes) / span if disk and pdisk else 0.0
        figures["net_sent_bps"] = (net.bytes_sent - pnet.bytes_sent) / span if net and pnet else 0.0
        figures["net_recv_bps"] = (net.bytes_recv - pnet.bytes_recv) / span if net and pnet else 0.0
    return figures, (disk, net, now)


def analyse(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Averages and maxima per figure, and the anomalies among the samples.

    A figure of a sample is an anomaly when it is above mean + 2 population standard deviations of
    that figure over the report (`rule: "spike"`; a spike needs a handful of samples to stand out),
    or when it is CPU or memory percent above 90 (`rule: "high"`). `t` is seconds since the start.
    The first MAX_ANOMALIES are listed, `anomaly_count` says how many there were.
    """
    keys = sorted({k for s in samples for k in s if k != "t"})
    averages: dict[str, float] = {}
    maxima: dict[str, float] = {}
    limits: dict[str, float] = {}
    for key in keys:
        values = [s[key] for s in samples if key in s]
        mean = statistics.fmean(values)
        averages[key], maxima[key] = round(mean, 3), round(max(values), 3)
        limits[key] = mean + 2 * statistics.pstdev(values)
    anomalies = []
    for s in samples:
        for key in keys:
            value = s.get(key)
            if value is None:
                continue
            if key in ("cpu_percent", "memory_percent") and value > HIGH_PERCENT:
                anomalies.append({"t": s["t"], "figure": key, "value": round(value, 3), "rule": "high"})
            elif value > limits[key]:
                anomalies.append({"t": s["t"], "figure": key, "value": round(value, 3), "rule": "spike"})
    return {
        "averages": averages,
        "maxima": maxima,
        "anomalies": anomalies[:MAX_ANOMALIES],
        "anomaly_count": len(anomalies),
    }


async def resource_report(duration_s: float, interval_s: float) -> dict[str, Any]:
    """Sample every `interval_s` for `duration_s` (round(duration / interval) samples, at least one),
    sleeping on the event loop between samples."""
    count = max(1, round(duration_s / interval_s))
    _, previous = _sample(None)  # primes psutil's CPU percent and the IO counters
    started = time.monotonic()
    samples: list[dict[str, float]] = []
    for i in range(1, count + 1):
        # Aim at fixed times from the start, so slow samples do not stretch the report.
        await asyncio.sleep(max(0.0, started + i * interval_s - time.monotonic()))
        figures, previous = _sample(previous)
        samples.append({"t": round(time.monotonic() - started, 3), **figures})
    return {"samples": len(samples), "duration_s": duration_s, "interval_s": interval_s, **analyse(samples)}
