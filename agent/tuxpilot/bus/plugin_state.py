"""The plugin-state bucket: each host's agent keeps there what it knows of its plugins (key
`<host>.<plugin>`, a `PluginState`); `tuxpilot status` reads it. Plugins cannot write it."""

from __future__ import annotations

import structlog
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from tuxpilot.bus.streams import bucket_entries
from tuxpilot.protocol.names import Names, Subjects, registry_key
from tuxpilot.protocol.plugin_state import MAX_STATE_BYTES, PluginState

log = structlog.get_logger("tuxpilot.plugin_state")

# A host has tens of plugins, not thousands: bounded so that nothing can grow it without end.
MAX_BUCKET_BYTES = 16 * 1024 * 1024
LIST_TIMEOUT_S = 5.0


async def state_bucket(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> KeyValue:
    name = Names.of(subjects).plugin_state
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(
            bucket=name, history=1, replicas=replicas, max_value_size=MAX_STATE_BYTES,
            max_bytes=MAX_BUCKET_BYTES, description="TuxPilot: each host's plugins as its agent sees them",
        )


async def put_state(kv: KeyValue, state: PluginState) -> None:
    await kv.put(registry_key(state.host, state.plugin), state.to_json()[:MAX_STATE_BYTES])


async def forget_state(kv: KeyValue, host: str, plugin: str) -> None:
    """A removed plugin's state, deleted."""
    await kv.delete(registry_key(host, plugin))


async def read_states(js: JetStreamContext, subjects: Subjects) -> dict[str, PluginState]:
    """Every host's plugin states, by `<host>.<plugin>`; empty when there is no bucket (yet)."""
    try:
        await js.key_value(Names.of(subjects).plugin_state)
    except BucketNotFoundError:
        return {}

    found: dict[str, PluginState] = {}
    # Read by message gets, not a consumer: the operator's user may not create consumers.
    for key, value in (await bucket_entries(js, Names.of(subjects).plugin_state, limit_s=LIST_TIMEOUT_S)).items():
        try:
            found[key] = PluginState.model_validate_json(value)
        except ValidationError as exc:
            log.warning("plugin_state.unreadable", key=key, error=str(exc.errors()[0]["msg"]))
    return found
