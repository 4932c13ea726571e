"""sysmon, the built-in system monitor plugin: its probes on this machine, its manifest, and its endpoints
as an operator with `nats req` meets them (real server, the plugin loaded from its folder or run as a script)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from tuxpilot.agent.config import Config
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol import schemas
from tuxpilot.protocol.manifest import load
from tuxpilot.protocol.models import Event
from tuxpilot.sdk.plugin import Plugin, load_plugin, with_defaults

FOLDER = Path(__file__).resolve().parent.parent / "plugins" / "sysmon"
SUBJECT = "tuxpilot.exec.test-host.sysmon"
PROCESS_KEYS = {"pid", "ppid", "name", "username", "cmdline", "cpu_percent", "memory_percent", "rss_bytes"}
TREE_KEYS = {"pid", "name", "username", "cpu_percent", "memory_percent", "children"}
FIGURES = {"cpu_percent", "memory_percent", "disk_read_bps", "disk_write_bps", "net_sent_bps", "net_recv_bps"}


def _load_probes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sysmon_probes_under_test", FOLDER / "probes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probes = _load_probes()


def walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from walk(node["children"])


# -- probes, on this machine ---------------------------------------------------------------------


def test_top_processes_by_memory_include_this_process() -> None:
    found = probes.top_processes("memory", 100, 0)
    assert 1 < len(found) <= 100
    for p in found:
        assert set(p) == PROCESS_KEYS
        assert isinstance(p["pid"], int) and isinstance(p["rss_bytes"], int)
        assert len(p["cmdline"]) <= probes.CMDLINE_MAX
    assert found == sorted(found, key=lambda p: (p["memory_percent"], p["rss_bytes"]), reverse=True)
    me = next(p for p in found if p["pid"] == os.getpid())  # pytest holds more memory than most
    assert me["rss_bytes"] > 0 and me["memory_percent"] > 0
    assert "python" in me["name"] or "pytest" in me["name"]


def test_top_processes_by_cpu_are_sampled_and_sorted() -> None:
    found = probes.top_processes("cpu", 5, 0.1)
    assert len(found) == 5
    assert found == sorted(found, key=lambda p: (p["cpu_percent"], p["rss_bytes"]), reverse=True)
    assert all(p["cpu_percent"] >= 0 for p in found)


def test_process_tree_holds_this_process_under_its_parent() -> None:
    roots, count = probes.process_tree()
    nodes = list(walk(roots))
    assert count == len(nodes) > 1
    assert all(set(n) >= TREE_KEYS for n in nodes)
    assert os.getpid() in {n["pid"] for n in nodes}
    parent = next((n for n in nodes if n["pid"] == os.getppid()), None)
    if parent is not None:  # none when this process is a container's pid 1
        assert os.getpid() in {c["pid"] for c in parent["children"]}


def test_process_tree_from_a_root_and_cut_at_a_depth() -> None:
    [me], count = probes.process_tree(os.getpid())
    assert me["pid"] == os.getpid() and count == len(list(walk([me])))
    full, _ = probes.process_tree()
    roots, count = probes.process_tree(max_depth=1)
    assert count == len(roots)
    assert all(not r["children"] for r in roots)
    assert any(r.get("truncated") for r in roots) == any(r["children"] for r in full)
    assert probes.process_tree(999_999_999) == ([], 0)


async def test_resource_report_samples_every_interval() -> None:
    report = await probes.resource_report(0.3, 0.1)
    assert report["samples"] == 3
    assert set(report["averages"]) == set(report["maxima"]) == FIGURES
    for key in FIGURES:
        assert 0 <= report["averages"][key] <= report["maxima"][key]
    assert report["anomaly_count"] == len(report["anomalies"])


# -- the anomaly rule, on samples we make --------------------------------------------------------


def _samples(cpu: list[float], memory: float = 50.0) -> list[dict[str, float]]:
    return [{"t": i / 10, "cpu_percent": v, "memory_percent": memory} for i, v in enumerate(cpu)]


def test_analyse_flags_a_spike_above_mean_plus_two_sd() -> None:
    result = probes.analyse(_samples([10, 11, 9, 10, 12, 10, 11, 10, 9, 60]))
    assert result["anomalies"] == [{"t": 0.9, "figure": "cpu_percent", "value": 60, "rule": "spike"}]
    assert result["maxima"]["cpu_percent"] == 60
    assert result["averages"] == {"cpu_percent": 15.2, "memory_percent": 50}


def test_analyse_flags_cpu_or_memory_above_90_even_when_steady() -> None:
    result = probes.analyse(_samples([95, 95, 95], memory=90))  # 90 is not above 90
    assert [(a["figure"], a["rule"]) for a in result["anomalies"]] == [("cpu_percent", "high")] * 3


def test_analyse_finds_nothing_in_steady_figures_and_caps_its_list() -> None:
    assert probes.analyse(_samples([20.0] * 50))["anomalies"] == []
    flood = probes.analyse(_samples([99.0] * (probes.MAX_ANOMALIES + 50)))
    assert len(flood["anomalies"]) == probes.MAX_ANOMALIES
    assert flood["anomaly_count"] == probes.MAX_ANOMALIES + 50


# -- the manifest ----------------------------------------------------------------------------------


def test_manifest_is_valid() -> None:
    schemas.validator("manifest").check(tomllib.loads((FOLDER / "plugin.toml").read_text()))
    manifest = load(FOLDER)
    assert (manifest.name, manifest.version, manifest.runtime, manifest.category) == (
        "sysmon",
        "1.0.0",
        "python",
        "monitoring",
    )
    assert set(manifest.actions) == {"process_tree", "top_processes", "resource_report"}
    assert set(manifest.subscribes) == {"cpu.high", "memory.high"}
    assert [p.value for p in manifest.permissions] == ["filesystem_read"]
    for name, spec in manifest.actions.items():
        assert spec.permission is not None and spec.permission.value == "filesystem_read"
        assert spec.params["additionalProperties"] is False
        manifest.params_validator(name).check(with_defaults(spec.params, {}))  # the defaults are valid params


# -- the endpoints, on a real server -----------------------------------------------------------------


@pytest.fixture
async def sysmon(nc: Client, config: Config) -> AsyncIterator[Plugin]:
    plugin = load_plugin(FOLDER)
    await plugin.start(nc, config)
    try:
        yield plugin
    finally:
        await plugin.stop()


async def ask(nc: Client, action: str, body: bytes, subject: str = SUBJECT) -> tuple[dict[str, Any], dict[str, str]]:
    msg = await nc.request(f"{subject}.{action}", body, timeout=10)
    assert msg.data, "never an empty body"
    return json.loads(msg.data), dict(msg.headers or {})


async def test_top_processes_by_memory_lists_real_processes(nc: Client, sysmon: Plugin) -> None:
    doc, headers = await ask(nc, "top_processes", b'{"n": 5, "by": "memory"}')
    assert "Nats-Service-Error-Code" not in headers
    schemas.validator("result").check(doc)
    assert (doc["status"], doc["message"]) == ("ok", "5 processes by memory")
    processes = doc["data"]["processes"]
    assert len(processes) == 5
    assert processes == sorted(processes, key=lambda p: (p["memory_percent"], p["rss_bytes"]), reverse=True)
    everyone, _ = await ask(nc, "top_processes", b'{"n": 100, "by": "memory", "sample_s": 0}')
    assert os.getpid() in {p["pid"] for p in everyone["data"]["processes"]}


async def test_empty_body_means_defaults(nc: Client, sysmon: Plugin) -> None:
    doc, _ = await ask(nc, "top_processes", b"")
    assert doc["status"] == "ok"
    assert doc["data"]["by"] == "cpu"
    assert len(doc["data"]["processes"]) == 10


async def test_process_tree_contains_this_process(nc: Client, sysmon: Plugin) -> None:
    doc, _ = await ask(nc, "process_tree", b"{}")
    assert doc["data"]["count"] > 1
    subtree, _ = await ask(nc, "process_tree", json.dumps({"root_pid": os.getpid(), "sample_s": 0}).encode())
    assert subtree["data"]["tree"][0]["pid"] == os.getpid()
    missing, headers = await ask(nc, "process_tree", b'{"root_pid": 999999999}')
    assert missing["code"] == "not_found"
    assert headers["Nats-Service-Error-Code"] == "404"


async def test_resource_report_samples_and_analyses(nc: Client, sysmon: Plugin) -> None:
    doc, _ = await ask(nc, "resource_report", b'{"duration_s": 0.3, "interval_s": 0.1}')
    data = doc["data"]
    assert data["samples"] >= 3
    assert set(data["averages"]) == set(data["maxima"]) == FIGURES
    assert isinstance(data["anomalies"], list)
    bad, headers = await ask(nc, "resource_report", b'{"duration_s": 1, "interval_s": 5}')
    schemas.validator("error").check(bad)
    assert bad["code"] == "invalid_params"
    assert headers["Nats-Service-Error-Code"] == "400"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{nope", "bad_request"),
        (b"\xff\xfe\x00", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'{"n": "five"}', "invalid_params"),
        (b'{"n": 0}', "invalid_params"),
        (b'{"n": 101}', "invalid_params"),
        (b'{"by": "disk"}', "invalid_params"),
        (b'{"sample_s": -1}', "invalid_params"),
        (b'{"colour": "blue"}', "invalid_params"),
    ],
)
async def test_bad_params_get_an_error_document(nc: Client, sysmon: Plugin, body: bytes, code: str) -> None:
    doc, headers = await ask(nc, "top_processes", body)
    schemas.validator("error").check(doc)
    assert doc["code"] == code
    assert headers["Nats-Service-Error-Code"] == "400"
    again, _ = await ask(nc, "top_processes", b'{"n": 1, "sample_s": 0}')  # and it keeps serving
    assert again["status"] == "ok"


@pytest.mark.parametrize(
    ("event_type", "by", "words"), [("memory.high", "memory", "memory at 95%"), ("cpu.high", "cpu", "CPU at 97.5%")]
)
async def test_high_usage_proposes_top_processes(
    nc: Client, sysmon: Plugin, event_type: str, by: str, words: str
) -> None:
    proposals = await nc.subscribe("tuxpilot.proposal.test-host.*")
    event = Event.new(event_type, "test-host", value=95 if by == "memory" else 97.5)
    await nc.publish(f"tuxpilot.evt.test-host.{event_type}", event.to_json())
    proposal = json.loads((await proposals.next_msg(timeout=10)).data)
    schemas.validator("proposal").check(proposal)
    assert (proposal["event_id"], proposal["plugin"]) == (event.id, "sysmon")
    [action] = proposal["actions"]
    assert (action["plugin"], action["action"], action["params"]) == ("sysmon", "top_processes", {"by": by, "n": 10})
    assert words in action["reason"]


async def test_service_is_discoverable(nc: Client, sysmon: Plugin) -> None:
    info = json.loads((await nc.request("$SRV.INFO.sysmon", b"", timeout=5)).data)
    assert {e["subject"] for e in info["endpoints"]} == {
        f"{SUBJECT}.process_tree",
        f"{SUBJECT}.top_processes",
        f"{SUBJECT}.resource_report",
    }
    assert info["metadata"]["host"] == "test-host"


async def test_runs_as_a_script(nc: Client, nats_server: NatsServer, tmp_path: Path) -> None:
    """`python plugins/sysmon/plugin.py` from anywhere: serves until SIGTERM, then exits cleanly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
    env |= {
        "TUXPILOT_NATS_URL": nats_server.url,
        "TUXPILOT_HOST_ID": "script-host",
        "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),  # no config file of the user's
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FOLDER / "plugin.py"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        doc: dict[str, Any] = {}
        for _ in range(150):
            try:
                doc, _headers = await ask(
                    nc, "top_processes", b'{"n": 3, "sample_s": 0}', subject="tuxpilot.exec.script-host.sysmon"
                )
                break
            except (NoRespondersError, NatsTimeout):
                assert proc.returncode is None, "the plugin exited"
                await asyncio.sleep(0.1)
        assert doc.get("status") == "ok", "the plugin never answered"
        assert len(doc["data"]["processes"]) == 3
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=15)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
