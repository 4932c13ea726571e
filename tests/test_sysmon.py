"""sysmon, the built-in system monitor plugin: its probes on this machine, and its endpoints as an
operator with `nats req` meets them (real server, the plugin loaded from its folder)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from agent import schemas
from agent.config import Config
from agent.manifest import load
from agent.models import Event
from agent.sdk import Plugin, load_plugin

FOLDER = Path(__file__).resolve().parent.parent / "plugins" / "sysmon"
SUBJECT = "tuxpilot.act.test-host.sysmon"


@pytest.fixture
async def sysmon(nc: Client, config: Config) -> AsyncIterator[Plugin]:
    plugin = load_plugin(FOLDER)
    await plugin.start(nc, config)
    yield plugin
    await plugin.stop()


async def ask(nc: Client, action: str, body: bytes) -> tuple[dict[str, object], dict[str, str]]:
    msg = await nc.request(f"{SUBJECT}.{action}", body, timeout=10)
    assert msg.data, "never an empty body"
    return json.loads(msg.data), dict(msg.headers or {})


def test_manifest_is_valid() -> None:
    manifest = load(FOLDER)
    assert manifest.name == "sysmon"
    assert set(manifest.actions) == {"process_tree", "top_processes", "resource_report"}
    assert set(manifest.subscribes) == {"cpu.high", "memory.high"}


async def test_top_processes_by_memory_lists_real_processes(nc: Client, sysmon: Plugin) -> None:
    doc, headers = await ask(nc, "top_processes", b'{"n": 5, "by": "memory"}')
    assert "Nats-Service-Error-Code" not in headers
    schemas.validator("result").check(doc)
    processes = doc["data"]["processes"]  # type: ignore[index]
    assert len(processes) == 5
    assert processes == sorted(processes, key=lambda p: (p["memory_percent"], p["rss_bytes"]), reverse=True)
    everyone, _ = await ask(nc, "top_processes", b'{"n": 100, "by": "memory"}')
    assert os.getpid() in {p["pid"] for p in everyone["data"]["processes"]}  # type: ignore[index]


async def test_empty_body_means_defaults(nc: Client, sysmon: Plugin) -> None:
    doc, _ = await ask(nc, "top_processes", b"")
    assert doc["status"] == "ok"
    assert doc["data"]["by"] == "cpu"  # type: ignore[index]
    assert len(doc["data"]["processes"]) == 10  # type: ignore[index]


async def test_process_tree_contains_this_process(nc: Client, sysmon: Plugin) -> None:
    doc, _ = await ask(nc, "process_tree", b"{}")
    assert doc["data"]["count"] > 1  # type: ignore[index]
    subtree, _ = await ask(nc, "process_tree", json.dumps({"root_pid": os.getpid()}).encode())
    assert subtree["data"]["tree"][0]["pid"] == os.getpid()  # type: ignore[index]
    missing, headers = await ask(nc, "process_tree", b'{"root_pid": 999999999}')
    assert missing["code"] == "not_found"
    assert headers["Nats-Service-Error-Code"] == "404"


async def test_resource_report_samples_and_analyses(nc: Client, sysmon: Plugin) -> None:
    doc, _ = await ask(nc, "resource_report", b'{"duration_s": 0.35, "interval_s": 0.1}')
    data = doc["data"]
    assert data["samples"] >= 3  # type: ignore[index]
    for key in ("cpu_percent", "memory_percent", "disk_read_bps", "net_sent_bps"):
        assert key in data["averages"] and key in data["maxima"]  # type: ignore[index]
    bad, _ = await ask(nc, "resource_report", b'{"duration_s": 1, "interval_s": 5}')
    assert bad["code"] == "invalid_params"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{nope", "bad_request"),
        (b"\xff\xfe\x00", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'{"n": "five"}', "invalid_params"),
        (b'{"n": 0}', "invalid_params"),
        (b'{"by": "disk"}', "invalid_params"),
        (b'{"colour": "blue"}', "invalid_params"),
    ],
)
async def test_bad_params_get_an_error_document(nc: Client, sysmon: Plugin, body: bytes, code: str) -> None:
    doc, headers = await ask(nc, "top_processes", body)
    schemas.validator("error").check(doc)
    assert doc["code"] == code
    assert headers["Nats-Service-Error-Code"] == "400"
    again, _ = await ask(nc, "top_processes", b'{"n": 1}')  # and it keeps serving
    assert again["status"] == "ok"


async def test_memory_high_proposes_top_processes_by_memory(nc: Client, sysmon: Plugin) -> None:
    proposals = await nc.subscribe("tuxpilot.proposal.test-host")
    event = Event.new("memory.high", "test-host", value=95.0)
    await nc.publish("tuxpilot.evt.test-host.memory.high", event.to_json())
    proposal = json.loads((await proposals.next_msg(timeout=10)).data)
    assert proposal["event_id"] == event.id
    [action] = proposal["actions"]
    assert (action["plugin"], action["action"], action["params"]["by"]) == ("sysmon", "top_processes", "memory")


async def test_service_is_discoverable(nc: Client, sysmon: Plugin) -> None:
    info = json.loads((await nc.request("$SRV.INFO.sysmon", b"", timeout=5)).data)
    assert {e["subject"] for e in info["endpoints"]} == {
        f"{SUBJECT}.process_tree", f"{SUBJECT}.top_processes", f"{SUBJECT}.resource_report"
    }
    assert info["metadata"]["host"] == "test-host"
