"""The bench: percentiles, the in-flight window, and a small real run whose JSON carries every figure.

No timing is asserted: figures depend on the machine. What is asserted is that every event got exactly
one result, each action was executed, and nothing the report promises is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tuxpilot.bench import Tracker, bench_plugin_dir, percentile
from tuxpilot.protocol.manifest import builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.runtimes.loader import scan

RUN_KEYS = ("events", "results", "throughput_eps", "p50_ms", "p90_ms", "p99_ms", "max_ms")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 50) == 7.0
    assert percentile([], 50) is None


async def test_tracker_keeps_the_window_and_counts_each_event_once() -> None:
    tracker = Tracker(events=10, in_flight=3, offset=100)
    outstanding: list[int] = []
    widest = 0

    async def send(seq: int) -> None:
        nonlocal widest
        outstanding.append(seq)
        widest = max(widest, len(outstanding))
        asyncio.get_running_loop().call_soon(answer)

    def answer() -> None:
        seq = outstanding.pop(0)
        tracker.result(seq, ok=seq != 105)
        tracker.result(seq, ok=True)  # a second result for the same event
        tracker.result(7, ok=True)  # an event of no run of ours

    figures = await tracker.run(send)
    assert widest <= 3
    assert (figures.results, figures.ok, figures.duplicates) == (10, 9, 10)
    assert tracker.strays == 10
    assert len(figures.latencies_ms) == 10


def test_the_bench_plugin_is_not_a_built_in_plugin() -> None:
    assert "noop" not in {f.name for f in scan([builtin_dir()])}
    assert bench_plugin_dir().parent != builtin_dir()


def test_noop_plugin_manifest() -> None:
    manifest = load_manifest(bench_plugin_dir())
    assert manifest.category == "development" and manifest.runtime == "python"
    assert [p.value for p in manifest.permissions] == ["filesystem_read"]
    assert manifest.subscribes == ["bench.*"]
    echo = manifest.actions["echo"]
    assert echo.permission is not None and echo.permission.value == "filesystem_read"
    manifest.params_validator("echo").check({"seq": 3, "value": 3.0})


@pytest.mark.slow
def test_small_bench_gives_one_result_per_event_and_every_figure(tmp_path: Path) -> None:
    config = tmp_path / "tuxpilot.toml"
    config.write_text("")  # the defaults, whatever the machine's own config says
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    env["TUXPILOT_CONFIG"] = str(config)

    # In a process of its own, as a user runs it: the bench configures logging for its process.
    outcome = subprocess.run(
        [sys.executable, "-m", "tuxpilot.cli", "bench", "--events", "200", "--in-flight", "16", "--warmup", "20",
         "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )

    assert outcome.returncode == 0, outcome.stderr[-3000:]
    doc = json.loads(outcome.stdout)
    for run in ("floor", "durable_floor", "pipeline"):
        figures = doc[run]
        assert all(figures[key] is not None for key in RUN_KEYS), figures
        assert figures["events"] == figures["results"] == figures["ok"] == 200
        assert figures["duplicates"] == 0
        assert figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert figures["cpu_us_per_event"]["bench"] > 0
    assert set(doc["pipeline"]["cpu_us_per_event"]) == {"bench", "plugin", "server"}
    assert all(value > 0 for value in doc["ratio"].values()), doc["ratio"]
    agent = doc["agent"]
    assert agent["ready_s"] > 0 and agent["rss_mb"] >= agent["uss_mb"] > 0
    assert agent["idle_cpu_pct"] is None  # only with --idle
    # The default install's footprint: the agent, its embedded server and its default plugin, and the sum.
    assert agent["server"]["rss_mb"] > 0 and agent["plugins"]["sysmon"]["rss_mb"] > 0
    parts = agent["rss_mb"] + agent["server"]["rss_mb"] + sum(p["rss_mb"] for p in agent["plugins"].values())
    assert agent["total_rss_mb"] == pytest.approx(parts)
    assert agent["total_idle_cpu_pct"] is None
