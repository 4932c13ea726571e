"""The prometheus plugin (JavaScript) run by a real agent, scraped by a real Prometheus server.

The agent runs with its embedded server and generated authorization, so the plugin reads results
and metrics only as far as its manifest's `reads` lets its NATS user; Prometheus (Debian's package)
scrapes it every second, and its HTTP API must return the TuxPilot series with the expected values.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import Config, load_config
from tuxpilot.agent.status import snapshot
from tuxpilot.bus import connect as bus
from tuxpilot.protocol.manifest import builtin_dir
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects

from tests.conftest import need

pytestmark = pytest.mark.slow
HOST = "prom-host"
PLUGIN_DIR = builtin_dir() / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except OSError as exc:
        return 0, str(exc)


def need_node() -> None:
    need("node", shutil.which("node") is not None, "the javascript runtime needs node on PATH")
    need("npm", shutil.which("npm") is not None, "the prometheus plugin's dependencies are installed with npm")


@pytest.fixture
def prom_config(tmp_path: Path) -> Config:
    return load_config(
        environ={
            "TUXPILOT_HOST_ID": HOST,
            "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
            "TUXPILOT_RUN_PLUGINS": "prometheus",
            "TUXPILOT_MONITOR_METRICS_INTERVAL_S": "1",
            "TUXPILOT_PLUGINS": json.dumps({"prometheus": {"config": {
                "port": free_port(),
                "metrics": {"tuxpilot_test_jobs_total": {"type": "counter", "labels": ["job"], "help": "test"}},
            }}}),
        }
    )


@pytest.fixture
async def agent(prom_config: Config) -> AsyncIterator[Agent]:
    need_node()
    agent = Agent(prom_config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


@pytest.fixture
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    need("prometheus", found is not None, "install Debian's prometheus package (apt-get install prometheus)")
    assert found is not None
    return found


class Prometheus:
    """A real Prometheus server with a temporary config scraping one target every second."""

    def __init__(self, binary: str, workdir: Path, target: str):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: tuxpilot\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_get(url)
        if status != 200:
            return []
        found: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return found

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(prometheus_bin: str, tmp_path: Path, prom_config: Config) -> Iterator[Prometheus]:
    port = prom_config.plugin("prometheus").config["port"]
    server = Prometheus(prometheus_bin, tmp_path, f"127.0.0.1:{port}")
    yield server
    server.stop()


async def value_of(prom: Prometheus, promql: str) -> float | None:
    found = await asyncio.to_thread(prom.query, promql)
    return float(found[0]["value"][1]) if found else None


async def test_prometheus_scrapes_the_events_an_agent_saw(agent: Agent, prometheus: Prometheus) -> None:
    config = agent.config
    port = config.plugin("prometheus").config["port"]
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    up: list[str] = []

    async def poll() -> None:
        status, body = await asyncio.to_thread(http_get, metrics_url)
        if status == 200:
            up.append(body)

    deadline = asyncio.get_running_loop().time() + 60
    while not up and asyncio.get_running_loop().time() < deadline:
        await poll()
        await asyncio.sleep(0.2)
    assert up, f"the prometheus plugin never served {metrics_url}"

    # Events through the bus as an operator sends them (the operator's generated credentials).
    nc = await bus.connect(bus.local_nats(config), agent.url, name="test-operator")
    subjects = Subjects.of(config)
    sent = 7
    try:
        # `tuxpilot status` shows the JavaScript plugin like any other, with the user and pid it runs as.
        running = (await snapshot(nc, subjects))["running"]
        [prom] = [r for r in running if r["plugin"] == "prometheus"]
        assert prom["host"] == HOST and prom["pid"] and prom["user"]
        assert agent.host is not None and prom["pid"] == str(agent.host.plugins["prometheus"].pid)
        for i in range(sent):
            event = Event.new("promtest.ping", HOST, severity="info", value=i, source="test")
            await bus.publish_event(nc, subjects, event)
        await bus.publish_event(nc, subjects, Event.new("promtest.ping", HOST, severity="critical", source="test"))
        # An operator's call through the gate's public endpoint: the gate runs it on the plugin's private
        # one and records the result, which the plugin counts (it `reads` results).
        reply = await nc.request(subjects.act("prometheus", "export_metrics"), b"{}", timeout=10)
        exported = json.loads(reply.data)
        assert exported["status"] == "ok", exported
        assert "tuxpilot_events_total" in exported["data"]["text"]
    finally:
        await nc.close()

    got: dict[str, float | None] = {}

    async def settled() -> bool:
        got["info"] = await value_of(prometheus, 'tuxpilot_events_total{type="promtest.ping",severity="info"}')
        got["critical"] = await value_of(prometheus, 'tuxpilot_events_total{type="promtest.ping",severity="critical"}')
        got["cpu"] = await value_of(prometheus, f'tuxpilot_host_cpu_percent{{host="{HOST}"}}')
        got["up"] = await value_of(prometheus, 'up{job="tuxpilot"}')
        got["gate"] = await value_of(prometheus, f'tuxpilot_gate_pending{{host="{HOST}"}}')
        got["results"] = await value_of(
            prometheus, 'tuxpilot_results_total{plugin="prometheus",action="export_metrics",status="ok"}')
        got["timed"] = await value_of(
            prometheus, 'tuxpilot_action_duration_seconds_count{plugin="prometheus",action="export_metrics"}')
        return (got["info"] == sent and got["critical"] == 1 and got["cpu"] is not None and got["up"] == 1
                and got["gate"] is not None and got["results"] == 1 and got["timed"] == 1)

    deadline = asyncio.get_running_loop().time() + 60
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, f"Prometheus answered {got}"
        await asyncio.sleep(0.5)
    # Host figures came from tuxpilot.metrics.<host>, which the plugin may read because it `reads` metrics;
    # the gate's backlog rides in the same snapshot (nothing is waiting for it here).
    assert 0 <= (got["cpu"] or 0) <= 100
    assert got["gate"] == 0
