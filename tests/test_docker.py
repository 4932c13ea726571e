"""The docker plugin against a real Docker Engine: real containers, real state changes, no mocked client.

The engine is found through DOCKER_HOST (`.ci/docker-engine.sh start` runs one on
unix:///tmp/tp-docker.sock with a local busybox image, since no registry is reachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from tuxpilot.agent.config import Config
from tuxpilot.agent.gate import Gate
from tuxpilot.agent.registry import Registry
from tuxpilot.bus import connect as bus
from tuxpilot.protocol import schemas
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects
from tuxpilot.runtimes.settings import PluginSettings
from tuxpilot.sdk.plugin import Plugin, load_plugin

from tests.conftest import need

FOLDER = Path(__file__).resolve().parent.parent / "plugins" / "docker"
IMAGE = "tuxpilot-test-busybox:latest"
ACT = "tuxpilot.exec.test-host.docker"
MiB = 1024 * 1024

pytestmark = pytest.mark.docker


def _engine() -> Any:
    import docker

    os.environ.setdefault("DOCKER_HOST", "unix:///tmp/tp-docker.sock")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        need("Docker engine", False, f"{os.environ['DOCKER_HOST']}: {type(exc).__name__}")
    return client


@pytest.fixture(scope="module")
def engine() -> Any:
    client = _engine()
    try:
        client.images.get(IMAGE)
    except Exception:
        need("test image", False, f"{IMAGE} missing: run `bash .ci/docker-engine.sh start`")
    return client


@pytest.fixture
def containers(engine: Any) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def run(command: str = "sleep 600", **kwargs: Any) -> Any:
        name = f"tp-test-{uuid.uuid4().hex[:8]}"
        c = engine.containers.run(
            IMAGE, ["/bin/sh", "-c", command], name=name, detach=True, network_mode="none",
            labels={"tuxpilot-test": "1"}, **kwargs,
        )
        made.append(c)
        return c

    yield run
    for c in made:
        with contextlib.suppress(Exception):
            c.remove(force=True)


@pytest.fixture
async def docker_plugin(nc: Client, config: Config, engine: Any) -> AsyncIterator[Plugin]:
    plugin = load_plugin(FOLDER)
    await plugin.start(nc, config)
    yield plugin
    await plugin.stop()


async def ask(nc: Client, action: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    msg = await nc.request(f"{ACT}.{action}", json.dumps(params or {}).encode(), timeout=60)
    return json.loads(msg.data), dict(msg.headers or {})


async def test_lists_the_containers_it_started_with_their_fields(
    nc: Client, docker_plugin: Plugin, containers: Callable[..., Any]
) -> None:
    running = containers()
    stopped = containers("true")
    stopped.wait(timeout=30)
    doc, _ = await ask(nc, "list_containers")
    schemas.validator("result").check(doc)
    names = {c["name"]: c for c in doc["data"]["containers"]}
    assert running.name in names
    assert stopped.name not in names
    entry = names[running.name]
    assert entry["id"] == running.short_id
    assert entry["image"] == IMAGE
    assert entry["state"] == "running"
    assert entry["created"].startswith("20")
    every, _ = await ask(nc, "list_containers", {"all": True})
    assert stopped.name in {c["name"] for c in every["data"]["containers"]}


async def test_stats_show_the_memory_a_container_holds(
    nc: Client, docker_plugin: Plugin, containers: Callable[..., Any]
) -> None:
    # 96 MiB written into the container's /dev/shm (tmpfs) is charged to its memory cgroup.
    hog = containers("dd if=/dev/zero of=/dev/shm/fill bs=1M count=96 2>/dev/null; sleep 600", shm_size="256m")
    idle = containers()
    import asyncio

    for _ in range(100):
        doc, _ = await ask(nc, "container_stats", {"container": hog.name})
        if doc["data"]["memory_usage"] >= 90 * MiB:
            break
        await asyncio.sleep(0.2)
    stats = doc["data"]
    assert 90 * MiB <= stats["memory_usage"] <= 140 * MiB, stats
    assert stats["memory_limit"] > stats["memory_usage"]
    assert stats["pids"] >= 1
    assert 0 <= stats["cpu_percent"] <= 100 * stats["online_cpus"]
    hungry, _ = await ask(nc, "memory_hungry_containers", {"n": 2})
    ranked = [c["name"] for c in hungry["data"]["containers"]]
    assert ranked[0] == hog.name
    assert idle.name in ranked or len(ranked) == 2


async def test_stop_start_restart_remove_change_the_real_state(
    nc: Client, docker_plugin: Plugin, containers: Callable[..., Any], engine: Any
) -> None:
    c = containers()
    stopped, _ = await ask(nc, "stop_container", {"container": c.name, "timeout": 1})
    assert stopped["data"]["state"] == "exited"
    c.reload()
    assert c.status == "exited"
    started, _ = await ask(nc, "start_container", {"container": c.name})
    assert started["data"]["state"] == "running"
    before = engine.api.inspect_container(c.id)["State"]["StartedAt"]
    restarted, _ = await ask(nc, "restart_container", {"container": c.name, "timeout": 1})
    assert restarted["data"]["state"] == "running"
    assert engine.api.inspect_container(c.id)["State"]["StartedAt"] != before
    refused, headers = await ask(nc, "remove_container", {"container": c.name})
    assert refused["code"] == "conflict"  # running: needs force
    assert headers["Nats-Service-Error-Code"] == "409"
    removed, _ = await ask(nc, "remove_container", {"container": c.name, "force": True})
    assert removed["data"]["state"] == "removed"
    assert c.name not in {x.name for x in engine.containers.list(all=True)}


async def test_prune_reclaims_a_stopped_container(
    nc: Client, docker_plugin: Plugin, containers: Callable[..., Any], engine: Any
) -> None:
    done = containers("true")
    done.wait(timeout=30)
    keep = containers()
    report, _ = await ask(nc, "prune")
    assert done.id in report["data"]["containers"]
    names = {x.name for x in engine.containers.list(all=True)}
    assert done.name not in names
    assert keep.name in names


async def test_a_bogus_container_and_a_failing_registry_are_clean_errors(nc: Client, docker_plugin: Plugin) -> None:
    doc, headers = await ask(nc, "container_stats", {"container": "no-such-container-4711"})
    schemas.validator("error").check(doc)
    assert doc["code"] == "not_found"
    assert headers["Nats-Service-Error-Code"] == "404"
    pulled, _ = await ask(nc, "pull_image", {"image": "127.0.0.1:9/nothing/here", "tag": "1"})
    assert pulled["code"] == "registry_error"
    images, _ = await ask(nc, "list_images")
    assert any(IMAGE in i["tags"] for i in images["data"]["images"])


def test_engine_down_is_named_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docker_ops_under_test", FOLDER / "ops.py")
    assert spec is not None and spec.loader is not None
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/tuxpilot-no-engine.sock")
    with pytest.raises(ops.DockerOpError) as caught:
        ops.client_from_env()
    assert caught.value.code == "unavailable"
    assert "not reachable" in caught.value.message


async def test_disk_low_ends_in_a_dry_run_prune_until_granted(
    nc: Client, config: Config, docker_plugin: Plugin, containers: Callable[..., Any]
) -> None:
    config.gate.cooldown_s = 0
    config.gate.cooldowns = {"docker.prune": 0}
    registry = Registry(nc, Subjects.of(config), {"docker": docker_plugin.manifest})
    await registry.start()
    gate = Gate(nc, config, registry)
    await gate.start()
    results = await nc.subscribe("tuxpilot.result.test-host.docker.prune")
    try:
        await bus.publish_event(
            nc, Subjects.of(config), Event.new("disk.low", "test-host", value=95.0, resource="/var")
        )
        dry = json.loads((await results.next_msg(timeout=30)).data)
        assert dry["status"] == "dry_run"
        assert dry["reason"] == "permission_not_granted"

        done = containers("true")
        done.wait(timeout=30)
        config.plugins["docker"] = PluginSettings(permissions=["filesystem_read", "system_access"])
        await bus.publish_event(
            nc, Subjects.of(config), Event.new("disk.low", "test-host", value=96.0, resource="/var")
        )
        executed = json.loads((await results.next_msg(timeout=60)).data)
        assert executed["status"] == "ok", executed
        assert done.id in executed["data"]["containers"]
    finally:
        await gate.stop()
        await registry.stop()


async def test_an_unhealthy_container_becomes_an_event(
    nc: Client, config: Config, engine: Any, containers: Callable[..., Any]
) -> None:
    config.plugins["docker"] = PluginSettings(config={"health_interval_s": 0.5})
    sick = containers(
        healthcheck={"test": ["CMD", "false"], "interval": 200_000_000, "retries": 1, "start_period": 0}
    )
    plugin = load_plugin(FOLDER)
    events = await nc.subscribe("tuxpilot.evt.test-host.container.unhealthy")
    await plugin.start(nc, config)
    try:
        event = Event.model_validate_json((await events.next_msg(timeout=30)).data)
        assert event.resource == sick.name
        assert event.source == "docker"
        assert event.data["reason"] == "health check failing"
    finally:
        await plugin.stop()


ENGINE_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "docker-engine.sh"


def _restartable() -> bool:
    return os.environ.get("DOCKER_HOST") == "unix:///tmp/tp-docker.sock" and Path("/tmp/tp-docker.pid").exists()


def _engine_script(command: str) -> None:
    subprocess.run(["bash", str(ENGINE_SCRIPT), command], check=True, capture_output=True, timeout=120)


async def test_the_plugin_answers_engine_down_and_survives_the_engine_restarting(
    nc: Client, docker_plugin: Plugin, engine: Any
) -> None:
    # Last in this file: it stops the engine the other tests use, and starts it again.
    need("restartable Docker engine", _restartable(), "only the engine .ci/docker-engine.sh started is ours to stop")
    listed, _ = await ask(nc, "list_containers")
    assert listed["status"] == "ok"
    try:
        await asyncio.to_thread(_engine_script, "stop")
        down, headers = await ask(nc, "list_containers")
        schemas.validator("error").check(down)
        assert down["code"] == "unavailable" and "not reachable" in down["message"]
        assert headers["Nats-Service-Error-Code"] == "503"
    finally:
        await asyncio.to_thread(_engine_script, "start")
    # The same plugin process, no restart: its next call reaches the new engine.
    back, _ = await ask(nc, "list_containers")
    assert back["status"] == "ok", back
