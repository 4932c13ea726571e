"""The JetStream streams and buckets TuxPilot keeps: events, proposals, the audit trail, executions.

Created idempotently by whoever starts first; an existing stream is updated to the configured limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from agent.bus import Subjects
from agent.config import StreamsConfig

log = structlog.get_logger("tuxpilot.streams")


@dataclass(frozen=True)
class Names:
    """Stream and bucket names for one subject prefix (names allow no dots)."""

    events: str
    proposals: str
    audit: str
    executions: str
    cooldowns: str

    @classmethod
    def of(cls, subjects: Subjects) -> Names:
        p = subjects.bucket_prefix
        return cls(f"{p}_events", f"{p}_proposals", f"{p}_audit", f"{p}_executions", f"{p}_cooldowns")


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


def plugin_consumer_name(plugin: str, host: str) -> str:
    """The durable consumer one plugin's replicas share on one host."""
    return f"{plugin}-{host}"


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
