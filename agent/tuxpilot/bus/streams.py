"""The JetStream streams and buckets TuxPilot keeps: events, proposals, the audit trail, executions.

Created idempotently by whoever starts first; an existing stream is updated to the configured limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from tuxpilot.bus.consumer import Durable, Handler
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.names import Names, Subjects, leases_bucket, plugin_consumer_name
from tuxpilot.settings import StreamsConfig

log = structlog.get_logger("tuxpilot.streams")


def _stream(
    name: str, subject: str, max_age: float, max_bytes: int, per_subject: int, what: str, cfg: StreamsConfig
) -> StreamConfig:
    # Every subject carries its publisher (host, plugin or category) in its tokens, so a per-subject
    # limit makes a flood on one subject evict that subject's oldest messages, not everyone's.
    return StreamConfig(
        name=name,
        subjects=[subject],
        description=what,
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
        max_msgs_per_subject=per_subject,
        num_replicas=cfg.replicas,
        duplicate_window=cfg.duplicate_window_s,
        allow_direct=True,  # readers (`tuxpilot audit`) get messages directly: they may not create consumers
    )


CLUSTER_REPLICAS = 3


def cluster_size(nc: Client) -> int:
    """Servers this client knows of: those configured plus those the cluster announced (connect_urls)."""
    return len({(u.hostname, u.port) for u in nc.servers})


def replicas_for(nc: Client, cfg: StreamsConfig) -> int:
    """The configured replicas, or (0) R3 on a cluster of three or more servers and R1 otherwise: R3 keeps
    every stream and bucket readable and writable with one server down; R2 would not (no majority)."""
    if cfg.replicas:
        return cfg.replicas
    return CLUSTER_REPLICAS if cluster_size(nc) >= CLUSTER_REPLICAS else 1


def stream_configs(subjects: Subjects, cfg: StreamsConfig) -> list[StreamConfig]:
    names, p = Names.of(subjects), subjects.prefix
    return [
        _stream(
            names.events,
            f"{p}.evt.>",
            cfg.events_max_age_s,
            cfg.events_max_bytes,
            cfg.events_max_msgs_per_subject,
            "TuxPilot events",
            cfg,
        ),
        _stream(
            names.proposals,
            f"{p}.proposal.>",
            cfg.proposals_max_age_s,
            cfg.proposals_max_bytes,
            cfg.proposals_max_msgs_per_subject,
            "TuxPilot proposals, consumed by each host's gate",
            cfg,
        ),
        _stream(
            names.audit,
            f"{p}.result.>",
            cfg.audit_max_age_s,
            cfg.audit_max_bytes,
            cfg.audit_max_msgs_per_subject,
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
        await wait_for_leader(js, config)
        log.debug("streams.ready", stream=config.name)


async def wait_for_leader(js: JetStreamContext, config: StreamConfig, *, limit_s: float = 15.0) -> None:
    """A replicated stream just created takes writes once its replicas have elected a leader; until then
    a publish finds no responder. Wait for it (a single server's stream has its leader at once)."""
    if (config.num_replicas or 1) <= 1 or config.name is None:
        return
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        try:
            info = await js.stream_info(config.name)
            if info.cluster is not None and info.cluster.leader:
                return
        except (NatsError, TimeoutError) as exc:
            log.debug("streams.no_leader_yet", stream=config.name, error=type(exc).__name__)
        if asyncio.get_running_loop().time() > deadline:
            log.warning("streams.no_leader", stream=config.name, waited_s=limit_s)
            return  # the caller's first write says what is wrong
        await asyncio.sleep(0.1)


def bucket_config(
    name: str, *, max_age: float, max_bytes: int, replicas: int = 1, what: str = "", rollups: bool = False
) -> StreamConfig:
    """A KV bucket's stream with TuxPilot's bounds: an age, a size, per-message TTLs allowed.

    When full it drops its oldest keys (discard old) instead of refusing new writes: a bucket that
    one plugin's flood filled must not stop the gate from claiming or pacing anyone's actions.
    No rollups by default: a writer allowed one key of a shared bucket could otherwise purge every key
    (`Nats-Rollup: all` on its own); nothing TuxPilot writes there uses one.
    """
    return StreamConfig(
        name=KV_STREAM_TEMPLATE.format(bucket=name),
        description=what,
        subjects=[f"$KV.{name}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
        max_msgs_per_subject=1,
        allow_rollup_hdrs=rollups,
        allow_msg_ttl=True,
        deny_delete=True,
        num_replicas=replicas,
        duplicate_window=min(120.0, max_age),
    )


async def bounded_bucket(
    js: JetStreamContext, name: str, *, max_age: float, max_bytes: int, replicas: int = 1, what: str = "",
    update: bool = True,
) -> KeyValue:
    """Create the bucket, or (`update`) bring an existing one (perhaps from an older version) to these bounds.
    A fleet's host passes `update=False`: its administrator configures the shared buckets (`fleet/hub.py`),
    and the host's key may not change them."""
    config = bucket_config(name, max_age=max_age, max_bytes=max_bytes, replicas=replicas, what=what)
    try:
        await js.add_stream(config)
    except BadRequestError:
        if update:
            await js.update_stream(config)
    await wait_for_leader(js, config)
    return await js.key_value(name)


# The schedules bucket (`agent/automation.py`): a yearly schedule's last run must outlive a year.
SCHEDULES_KEEP_S = 400 * 24 * 3600.0
SCHEDULES_MAX_BYTES = 8 * 1024 * 1024

LEASES_KEEP_S = 24 * 3600.0
LEASES_MAX_BYTES = 64 * 1024 * 1024


def leases_config(subjects: Subjects, replicas: int = 1) -> StreamConfig:
    """The fleet leases bucket (agent/leases.py). Discard new when full: a host flooding keys of its own
    makes leases fail (actions refused); it cannot evict the others' leases, as discard old would (letting
    more than K run). No rollups: one would purge every key."""
    config = bucket_config(leases_bucket(subjects), max_age=LEASES_KEEP_S, max_bytes=LEASES_MAX_BYTES,
                           replicas=replicas, what="TuxPilot fleet leases: one key per (limit, host)", rollups=False)
    config.discard = DiscardPolicy.NEW
    return config


async def ensure_leases_bucket(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> None:
    """Create the bucket (a fleet's administrator does; a single host's agent for itself)."""
    config = leases_config(subjects, replicas)
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)
    await wait_for_leader(js, config)


async def bucket_entries(
    js: JetStreamContext, bucket: str, keys: str = ">", *, limit_s: float = 5.0
) -> dict[str, bytes]:
    """Every live key of `bucket` matching `keys`, with its value, read by message gets: no consumer (which
    readers may not create), and within `limit_s` (TimeoutError), however many keys there are."""
    stream, prefix = KV_STREAM_TEMPLATE.format(bucket=bucket), f"$KV.{bucket}."

    async def read() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        seq = 1
        while True:
            try:
                msg = await js.get_msg(stream, seq=seq, subject=prefix + keys, next=True)
            except NotFoundError:
                return found
            key = (msg.subject or "").removeprefix(prefix)
            if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                found.pop(key, None)
            else:
                found[key] = msg.data or b""
            seq = (msg.seq or seq) + 1

    return await asyncio.wait_for(read(), limit_s)


def plugin_consumer(
    js: Any, manifest: Manifest, subjects: Subjects, cfg: StreamsConfig, handler: Handler, *, history: bool = False
) -> Durable:
    """The durable consumer of a plugin's events on one host: filters from its manifest's `subscribes`.

    A new consumer starts at events published from then on: a plugin installed today does not act
    on yesterday's disk.low. `history` (the host's `[plugins.<name>] history = true`) starts it at the
    oldest event the stream keeps instead; either way only when the consumer is first created.
    """
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
        deliver_policy=DeliverPolicy.ALL if history else DeliverPolicy.NEW,
    )


async def _no_handler(msg: Msg) -> None:
    raise RuntimeError("consumer created for someone else")


async def create_plugin_consumer(
    js: Any, manifest: Manifest, subjects: Subjects, cfg: StreamsConfig, *, history: bool = False
) -> None:
    """What the agent does for each local plugin under generated authorization (plugins may not)."""
    if manifest.subscribes:
        await plugin_consumer(js, manifest, subjects, cfg, _no_handler, history=history).ensure()


async def plugin_consumer_floor(js: Any, manifest: Manifest, subjects: Subjects) -> int | None:
    """The stream sequence up to which the plugin's consumer has every message acknowledged (None: it has no
    consumer)."""
    try:
        info = await js.consumer_info(Names.of(subjects).events, plugin_consumer_name(manifest.name, subjects.host))
    except NotFoundError:
        return None
    return int(info.ack_floor.stream_seq) if info.ack_floor else 0


async def rewind_plugin_consumer(js: Any, manifest: Manifest, subjects: Subjects, cfg: StreamsConfig, *,
                                 history: bool, floor: int) -> bool:
    """Make the plugin's consumer deliver again from `floor + 1` when it has got past it, as made from this
    manifest: what a replaced version acknowledged reaches the plugin again (its proposals carry the same
    proposal ids, which the proposals stream stores once). Whether it was rewound."""
    if not manifest.subscribes:
        return False
    consumer = plugin_consumer(js, manifest, subjects, cfg, _no_handler, history=history)
    now = await plugin_consumer_floor(js, manifest, subjects)
    if now is not None and now <= floor:
        return False
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(consumer.stream, consumer.name)
    await js.add_consumer(consumer.stream, config=dataclasses.replace(
        consumer.config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=floor + 1))
    log.info("consumer.rewound", consumer=consumer.name, resume_seq=floor + 1, was=now)
    return True


async def delete_plugin_consumer(js: Any, plugin: str, subjects: Subjects) -> None:
    """A plugin's durable consumer, deleted (none to delete is fine)."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(Names.of(subjects).events, plugin_consumer_name(plugin, subjects.host))


async def guard_plugin_consumers(
    js: Any, plugins: Callable[[], list[tuple[Manifest, bool]]], subjects: Subjects, cfg: StreamsConfig, every_s: float
) -> None:
    """Every `every_s`, check the consumers of the local plugins (`plugins()`: each manifest and its
    `history` setting, as they are now) and restore any that someone changed: the plugins' own users
    may not (`consumer.restored`). Runs until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        for manifest, history in plugins():
            if not manifest.subscribes:
                continue
            consumer = plugin_consumer(js, manifest, subjects, cfg, _no_handler, history=history)
            try:
                await consumer.ensure()
            except Exception as exc:  # the server is away: next round
                log.debug("streams.guard_failed", consumer=consumer.name, error=f"{type(exc).__name__}: {exc}"[:200])
