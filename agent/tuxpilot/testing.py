"""Helpers for testing plugins, as `structlog.testing` serves structlog users.

Call a plugin's handlers in-process, through the same steps a request or an event takes in a running
plugin (params parsed, validated and given their defaults; handlers matched by pattern; the proposal
built with its id), but without a bus:

    from tuxpilot.testing import call_action, deliver_event

    from myplugin.plugin import plugin

    def test_top_defaults():
        result = call_action(plugin, "top_processes")           # {} -> the schema's defaults
        assert result["status"] == "ok" and len(result["data"]["processes"]) == 5

    def test_proposes_on_memory_high():
        proposal = deliver_event(plugin, "memory.high", value=95.0)
        assert [a.action for a in proposal.actions] == ["top_processes"]

And for tests that need a real bus, a real nats-server on a free port with JetStream in a temporary
folder: `with nats_server() as server: ... server.url`, or the pytest fixture `tuxpilot_server`
(`pytest_plugins = ["tuxpilot.testing"]` in your conftest.py).

In async tests use `acall_action` and `adeliver_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.errors import ConfigError, Forbidden
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, Proposal, Severity, new_id
from tuxpilot.sdk.plugin import Context, Plugin
from tuxpilot.sdk.plugin import load_plugin as load_python_plugin

__all__ = [
    "EmittingContext",
    "acall_action",
    "adeliver_event",
    "call_action",
    "deliver_event",
    "load_plugin",
    "make_event",
    "nats_server",
]

TEST_HOST = "test-host"


@contextlib.contextmanager
def nats_server(store_dir: Path | None = None, **options: Any) -> Iterator[NatsServer]:
    """A real nats-server on a free loopback port, JetStream stored in `store_dir` (a temporary folder
    by default, removed afterwards); stopped on exit. `options` go to `NatsServer` (`max_payload`,
    `extra_config`…)."""
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            store_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tuxpilot-nats-")))
        server = NatsServer(store_dir, **options)
        stack.callback(server.stop)
        yield server.start()


@dataclass
class EmittingContext(Context):
    """A handler's context whose `emit` records the event (checked against `emits`) instead of
    publishing it."""

    emitted: list[Event] = field(default_factory=list)

    async def emit(self, event_type: str, **fields: Any) -> Event:
        category = event_type.split(".", 1)[0]
        if category not in self.plugin.manifest.emits:
            raise Forbidden(f"{self.plugin.name} may not emit {category!r} events (plugin.toml `emits`)")
        event = Event.new(event_type, self.host, source=self.plugin.name, **fields)
        self.emitted.append(event)
        return event


def load_plugin(folder: Path) -> Plugin:
    """The Plugin a plugin folder runs as: a Python plugin's own (its entry point imported), or for a
    `wasm` one the SDK plugin the wasm host makes of its built guest (the same sandbox and limits)."""
    if load_manifest(folder).runtime == "wasm":
        from tuxpilot.sdk import wasm  # wasmtime is loaded only for a wasm plugin

        plugin, _sandbox = wasm.load(folder)
        return plugin
    return load_python_plugin(folder)


def _context(plugin: Plugin, host: str, config: dict[str, Any] | None, **fields: Any) -> EmittingContext:
    log = structlog.get_logger("tuxpilot.plugin").bind(plugin=plugin.name, host=host)
    settings = {**plugin.manifest.config, **(config or {})}
    return EmittingContext(plugin=plugin, host=host, log=log, config=settings, **fields)


def make_event(event_type: str, *, host: str = TEST_HOST, severity: Severity = "warning", **fields: Any) -> Event:
    """A fresh event as the monitor would publish it (new id, current time)."""
    return Event.new(event_type, host, severity=severity, **fields)


async def acall_action(
    plugin: Plugin,
    action: str,
    params: dict[str, Any] | bytes | None = None,
    *,
    config: dict[str, Any] | None = None,
    host: str = TEST_HOST,
    action_id: str | None = None,
) -> dict[str, Any]:
    """Run `action` as a request would: params (a dict, or the raw body) are parsed, validated against
    the action's schema and given their defaults, then the handler runs. Returns the `result` document
    the caller would get (`{"status": "ok", "data": …}`, through JSON, so what cannot be sent fails
    here too). A refusal raises the TuxPilotError whose `to_doc()` the caller would get instead
    (`InvalidParams`, `BadRequest`, the handler's `ActionError`…); `config` is the plugin's own settings."""
    if action not in plugin.manifest.actions:
        raise ConfigError(f"{plugin.name} declares no action {action!r}")
    raw = params if isinstance(params, bytes) else json.dumps(params or {}).encode()
    ctx = _context(plugin, host, config, action=action, action_id=action_id or new_id())
    result = await plugin.run_action(action, raw, ctx)
    doc: dict[str, Any] = json.loads(result.to_json())
    return doc


async def adeliver_event(
    plugin: Plugin,
    event: Event | str,
    *,
    config: dict[str, Any] | None = None,
    host: str = TEST_HOST,
    **fields: Any,
) -> Proposal | None:
    """Deliver one event (an Event, or a type and `make_event` fields) as the plugin's consumer would:
    every matching handler runs. Returns the proposal the plugin would publish, or None when nothing
    was proposed; an event the manifest does not subscribe to raises ConfigError, as it would never
    arrive. A failing handler raises (on the bus, the event would be redelivered after a backoff)."""
    if isinstance(event, str):
        event = make_event(event, host=host, **fields)
    if not plugin.subscribed(event.type):
        raise ConfigError(f"{plugin.name} does not subscribe to {event.type!r} (plugin.toml `subscribes`)")
    return await plugin.propose_for(event, _context(plugin, host, config, event=event))


def call_action(
    plugin: Plugin,
    action: str,
    params: dict[str, Any] | bytes | None = None,
    *,
    config: dict[str, Any] | None = None,
    host: str = TEST_HOST,
    action_id: str | None = None,
) -> dict[str, Any]:
    """`acall_action`, for tests that are not async."""
    return asyncio.run(acall_action(plugin, action, params, config=config, host=host, action_id=action_id))


def deliver_event(
    plugin: Plugin, event: Event | str, *, config: dict[str, Any] | None = None, host: str = TEST_HOST, **fields: Any
) -> Proposal | None:
    """`adeliver_event`, for tests that are not async."""
    return asyncio.run(adeliver_event(plugin, event, config=config, host=host, **fields))


try:
    import pytest
except ModuleNotFoundError:  # a plugin's own runtime needs no pytest: the fixture is simply absent
    pass
else:

    @pytest.fixture
    def tuxpilot_server(tmp_path: Path) -> Iterator[NatsServer]:
        """A real nats-server with JetStream for one test (stopped afterwards): `tuxpilot_server.url`."""
        with nats_server(tmp_path / "nats") as server:
            yield server
