"""What sysmon measures, with psutil: plain functions returning JSON-able data."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

import psutil

_FIELDS = ["pid", "ppid", "name", "username", "cpu_percent", "memory_percent", "memory_info", "cmdline"]
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)
CMDLINE_MAX = 200
HIGH_PERCENT = 90.0


def _describe(info: dict[str, Any]) -> dict[str, Any]:
    mem = info.get("memory_info")
    cmdline = " ".join(info.get("cmdline") or [])
    return {
        "pid": info["pid"],
        "ppid": info.get("ppid"),
        "name": info.get("name") or "",
        "username": info.get("username"),
        "cmdline": cmdline[:CMDLINE_MAX],
        "cpu_percent": round(info.get("cpu_percent") or 0.0, 2),
        "memory_percent": round(info.get("memory_percent") or 0.0, 3),
        "rss_bytes": mem.rss if mem else 0,
    }


def processes(sample_s: float = 0.0) -> list[dict[str, Any]]:
    """Every process we may read; with `sample_s`, CPU percent measured over that window."""
    procs = list(psutil.process_iter())
    if sample_s > 0:
        for p in procs:
            with contextlib.suppress(*_GONE):
                p.cpu_percent(None)  # prime: the next call measures since now
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
    key = "cpu_percent" if by == "cpu" else "memory_percent"
    found = processes(sample_s if by == "cpu" else 0.0)
    return sorted(found, key=lambda p: (p[key], p["rss_bytes"]), reverse=True)[:n]


def process_tree(root_pid: int | None = None, max_depth: int = 32) -> tuple[list[dict[str, Any]], int]:
    """The forest of processes (or the subtree at `root_pid`) and how many processes it holds."""
    found = {p["pid"]: {**p, "children": []} for p in processes()}
    roots = []
    for node in found.values():
        parent = found.get(node["ppid"])
        if parent is not None and parent is not node:
            parent["children"].append(node)
        else:
            roots.append(node)
    if root_pid is not None:
        roots = [found[root_pid]] if root_pid in found else []

    def trim(node: dict[str, Any], depth: int) -> int:
        if depth >= max_depth:
            count = 1
            node["children"] = []
            node["truncated"] = True
            return count
        return 1 + sum(trim(child, depth + 1) for child in node["children"])

    return roots, sum(trim(r, 1) for r in roots)


def _sample(previous: tuple[Any, Any, float] | None) -> tuple[dict[str, float], tuple[Any, Any, float]]:
    disk, net, now = psutil.disk_io_counters(), psutil.net_io_counters(), time.monotonic()
    figures = {"cpu_percent": psutil.cpu_percent(None), "memory_percent": psutil.virtual_memory().percent}
    if previous is not None:
        pdisk, pnet, then = previous
        span = max(now - then, 1e-6)
        figures["disk_read_bps"] = (disk.read_bytes - pdisk.read_bytes) / span if disk and pdisk else 0.0
        figures["disk_write_bps"] = (disk.write_bytes - pdisk.write_bytes) / span if disk and pdisk else 0.0
        figures["net_sent_bps"] = (net.bytes_sent - pnet.bytes_sent) / span if net and pnet else 0.0
        figures["net_recv_bps"] = (net.bytes_recv - pnet.bytes_recv) / span if net and pnet else 0.0
    return figures, (disk, net, now)


def analyse(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Averages and maxima per figure; anomalies are samples above mean + 2 standard deviations,
    or CPU or memory at or above 90 %."""
    keys = sorted({k for s in samples for k in s if k != "t"})
    averages = {k: round(statistics.fmean(s[k] for s in samples if k in s), 3) for k in keys}
    maxima = {k: round(max(s[k] for s in samples if k in s), 3) for k in keys}
    anomalies = []
    for key in keys:
        values = [s[key] for s in samples if key in s]
        limit = statistics.fmean(values) + 2 * statistics.pstdev(values) if len(values) > 2 else float("inf")
        for s in samples:
            value = s.get(key)
            if value is None:
                continue
            if (value > limit and value > 0) or (key in ("cpu_percent", "memory_percent") and value >= HIGH_PERCENT):
                anomalies.append({"t": s["t"], "figure": key, "value": round(value, 3)})
    return {"averages": averages, "maxima": maxima, "anomalies": anomalies}


async def resource_report(duration_s: float, interval_s: float) -> dict[str, Any]:
    """Sample every `interval_s` for `duration_s` without blocking the event loop."""
    _, previous = _sample(None)
    psutil.cpu_percent(None)
    started = time.monotonic()
    samples: list[dict[str, float]] = []
    while time.monotonic() - started < duration_s:
        await asyncio.sleep(interval_s)
        figures, previous = _sample(previous)
        samples.append({"t": round(time.monotonic() - started, 3), **figures})
    return {"samples": len(samples), "duration_s": duration_s, "interval_s": interval_s, **analyse(samples)}
