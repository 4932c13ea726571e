"""The JetStream streams and buckets TuxPilot keeps: events, proposals, the audit trail, executions.

Created idempotently by whoever starts first; an existing stream is updated to the configured limits.
"""

from __future__ import annotations

from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from tuxpilot.bus.consumer import Durable, Handler
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.names import Names, Subjects, plugin_consumer_name
from tuxpilot.settings import StreamsConfig

log = structlog.get_logger("tuxpilot.streams")


def _stream(name: str, subject: str, max_age: float, max_bytes: int, what: str, cfg: StreamsConfig) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[subject],
        description=what,
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
        num_replicas=cfg.replicas,
        duplicate_window=cfg.duplicate_window_s,
    )


def stream_configs(subjects: Subjects, cfg: StreamsConfig) -> list[StreamConfig]:
    names, p = Names.of(subjects), subjects.prefix
    return [
        _stream(names.events, f"{p}.evt.>", cfg.events_max_age_s, cfg.events_max_bytes, "TuxPilot events", cfg),
        _stream(
            names.proposals,
            f"{p}.proposal.>",
            cfg.proposals_max_age_s,
            cfg.proposals_max_bytes,
            "TuxPilot proposals, consumed by each host's gate",
            cfg,
        ),
        _stream(
            names.audit,
            f"{p}.result.>",
            cfg.audit_max_age_s,
            cfg.audit_max_bytes,
            "TuxPilot audit trail: every gate decision and action outcome",
            cfg,
        ),
    ]


async def have_streams(js: JetStreamContext, subjects: Subjects) -> bool:
    try:
        await js.stream_info(Names.of(subjects).events)
    except NotFoundError:
        return False
    return True


async def ensure_streams(js: JetStreamContext, subjects: Subjects, cfg: StreamsConfig, *, update: bool = True) -> None:
    """Create the streams; with `update` (the agent) bring existing ones to the configured limits."""
    for config in stream_configs(subjects, cfg):
        try:
            await js.add_stream(config)
        except BadRequestError:
            if update:
                await js.update_stream(config)
        log.debug("streams.ready", stream=config.name)


async def bucket(js: JetStreamContext, name: str, *, ttl: float | None = None, replicas: int = 1) -> KeyValue:
    try:
        return await js.key_value(name)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(bucket=name, history=1, ttl=ttl, replicas=replicas)


def plugin_consumer(
    js: Any, manifest: Manifest, subjects: Subjects, cfg: StreamsConfig, handler: Handler
) -> Durable:
    """The durable consumer of a plugin's events on one host: filters from its manifest's `subscribes`."""
    return Durable(
        js,
        stream=Names.of(subjects).events,
        name=plugin_consumer_name(manifest.name, subjects.host),
        filter_subjects=[subjects.events(pattern, host=None) for pattern in manifest.subscribes],
        handler=handler,
        ack_wait=cfg.ack_wait_s,
        max_deliver=cfg.max_deliver,
        backoff=cfg.backoff_s,
        metadata={"tuxpilot": "plugin", "plugin": manifest.name, "host": subjects.host},
    )


async def _no_handler(msg: Msg) -> None:
    raise RuntimeError("consumer created for someone else")


async def create_plugin_consumer(js: Any, manifest: Manifest, subjects: Subjects, cfg: StreamsConfig) -> None:
    """What the agent does for each local plugin under generated authorization (plugins may not)."""
    if manifest.subscribes:
        await plugin_consumer(js, manifest, subjects, cfg, _no_handler).ensure()
