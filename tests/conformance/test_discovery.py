"""Discovery and the announcement: the micro service's $SRV.PING/INFO/STATS answers carry the protocol's
metadata, and they and the agent's registry entry agree with the manifest the host loaded."""

from __future__ import annotations

import json

import pytest
from nats.js.errors import KeyNotFoundError
from tuxpilot.protocol.names import registry_key
from tuxpilot.protocol.registry import RegistryEntry

from tests.conformance.conftest import HOST, PLUGIN, Bus, eventually

pytestmark = pytest.mark.slow

METADATA_KEYS = {"tuxpilot", "host", "plugin", "version", "instance", "api_version", "user", "pid"}


async def test_ping_finds_one_instance_with_the_protocol_metadata(bus: Bus) -> None:
    [ping] = await bus.discover("PING")
    assert ping["type"] == "io.nats.micro.v1.ping_response"
    assert (ping["name"], ping["version"]) == (PLUGIN, bus.manifest.version)
    meta = ping["metadata"]
    assert set(meta) >= METADATA_KEYS, f"missing metadata: {METADATA_KEYS - set(meta)}"
    assert meta["tuxpilot"] == "plugin"
    assert (meta["host"], meta["plugin"], meta["version"]) == (HOST, PLUGIN, bus.manifest.version)
    assert meta["api_version"] == bus.manifest.api_version
    assert meta["pid"].isdigit() and meta["user"] and meta["instance"]
    assert all(isinstance(v, str) for v in meta.values())


async def test_info_lists_one_endpoint_per_action_on_its_exec_subject_in_the_plugins_queue_group(bus: Bus) -> None:
    [info] = await bus.discover("INFO")
    assert info["type"] == "io.nats.micro.v1.info_response"
    assert info["description"] == bus.manifest.description[:256]
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert set(endpoints) == set(bus.manifest.actions)
    for action, endpoint in endpoints.items():
        assert endpoint["subject"] == bus.subjects.exec(PLUGIN, action)
        assert endpoint["queue_group"] == PLUGIN


async def test_stats_count_the_requests_served(bus: Bus) -> None:
    await bus.request("echo", {"text": "counted"})
    [stats] = await bus.discover("STATS")
    assert stats["type"] == "io.nats.micro.v1.stats_response"
    assert stats["metadata"]["tuxpilot"] == "plugin"
    echo = next(e for e in stats["endpoints"] if e["name"] == "echo")
    assert echo["num_requests"] >= 1


async def test_the_agents_registry_entry_and_the_announcement_agree_with_the_local_manifest(bus: Bus) -> None:
    kv = await bus.operator.jetstream().key_value(bus.names.plugins)

    async def entry() -> RegistryEntry | None:
        try:
            found = await kv.get(registry_key(HOST, PLUGIN))
        except KeyNotFoundError:
            return None
        return RegistryEntry.from_json(found.value or b"")

    registered = await eventually(entry, what="the registry entry")
    assert (registered.host, registered.plugin) == (HOST, PLUGIN)
    assert registered.manifest.to_doc() == bus.manifest.to_doc()
    [info] = await bus.discover("INFO")
    meta = info["metadata"]
    assert (meta["plugin"], meta["version"], meta["api_version"]) == (
        registered.plugin, registered.manifest.version, registered.manifest.api_version,
    )
    assert json.loads(registered.to_json())["manifest"]["name"] == meta["plugin"]
