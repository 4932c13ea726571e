"""What the fleet's administrator keeps on the hub: every stream and bucket the hosts share, created and
configured here (a host's key may not update, purge or delete any of them, nor create the leases bucket),
and the audit stream's sources, one per leaf host (see `fleet/leaf.py`)."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ExternalStream, StreamSource
from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.errors import NotFoundError

from tuxpilot.agent.approvals import ApprovalStore
from tuxpilot.bus.plugin_state import state_bucket
from tuxpilot.bus.registry import open_bucket
from tuxpilot.bus.streams import (
    SCHEDULES_KEEP_S,
    SCHEDULES_MAX_BYTES,
    bounded_bucket,
    ensure_leases_bucket,
    ensure_streams,
    replicas_for,
)
from tuxpilot.fleet.admin import Fleet
from tuxpilot.fleet.heartbeat import open_heartbeats
from tuxpilot.fleet.scopes import host_keyed_buckets
from tuxpilot.protocol.names import Names, Subjects, fleet_bucket, leaf_deliver, leaf_domain, schedules_bucket
from tuxpilot.settings import StreamsConfig


async def prepare(nc: Client, fleet: Fleet, cfg: StreamsConfig | None = None) -> list[str]:
    """Bring the hub to the roster: the leases bucket exists, the audit stream and the heartbeats bucket
    source every leaf host's own (its records, its beats). Returns the leaf domains sourced."""
    cfg = cfg or StreamsConfig()
    cfg = cfg.model_copy(update={"replicas": replicas_for(nc, cfg)})
    js = nc.jetstream()
    subjects = Subjects(fleet.prefix, "hub")
    await ensure_leases_bucket(js, subjects, cfg.replicas)
    try:
        await js.stream_info(Names.of(subjects).audit)
    except NotFoundError:  # no host made them yet
        await ensure_streams(js, subjects, cfg, update=False)
    await open_heartbeats(js, subjects, cfg.replicas)
    await _shared_buckets(nc, js, subjects, cfg)
    hosts = [host for host, record in sorted(fleet.hosts.items()) if record.leaf and not record.revoked]
    await _bring_sources(js, Names.of(subjects).audit, [_source(subjects, h, Names.of(subjects).audit,
                                                                 subjects.results(h)) for h in hosts])
    beats = KV_STREAM_TEMPLATE.format(bucket=fleet_bucket(subjects))
    await _bring_sources(js, beats, [_source(subjects, h, beats, f"$KV.{fleet_bucket(subjects)}.{h}") for h in hosts])
    return [leaf_domain(h) for h in hosts]


async def _shared_buckets(nc: Client, js: JetStreamContext, subjects: Subjects, cfg: StreamsConfig) -> None:
    """Every bucket whose keys the hosts write (each its own, `<host>.…`) exists, as an agent would create
    it, and allows no rollup: a host may write only its own keys, but `Nats-Rollup: all` on one of them
    would purge every key. A bucket a host created before (nats-py's KV allows rollups) is corrected here."""
    names = Names.of(subjects)
    await bounded_bucket(js, names.executions, max_age=cfg.executions_ttl_s, max_bytes=cfg.executions_max_bytes,
                         replicas=cfg.replicas, what="TuxPilot: action ids the gates claimed, and their outcome")
    await bounded_bucket(js, names.cooldowns, max_age=cfg.cooldowns_max_age_s, max_bytes=cfg.cooldowns_max_bytes,
                         replicas=cfg.replicas, what="TuxPilot: when each action last ran on each resource, per host")
    await bounded_bucket(js, schedules_bucket(subjects), max_age=SCHEDULES_KEEP_S, max_bytes=SCHEDULES_MAX_BYTES,
                         replicas=cfg.replicas, what="TuxPilot: when each host's schedules last ran")
    await ApprovalStore(nc, subjects, replicas=cfg.replicas).start()
    await open_bucket(js, subjects, cfg.replicas)
    await state_bucket(js, subjects, cfg.replicas)
    for bucket in [*host_keyed_buckets(subjects), fleet_bucket(subjects)]:
        config = (await js.stream_info(KV_STREAM_TEMPLATE.format(bucket=bucket))).config
        if config.allow_rollup_hdrs:
            config.allow_rollup_hdrs = False
            await js.update_stream(config)


def _source(subjects: Subjects, host: str, stream: str, only: str) -> StreamSource:
    """`stream` of the leaf host's own domain, delivered on its own subject, filtered to its own subjects: a
    compromised agent on the leaf that wrote another host's subjects there would not have them sourced."""
    external = ExternalStream(api=f"$JS.{leaf_domain(host)}.API", deliver=leaf_deliver(subjects, host))
    return StreamSource(name=stream, filter_subject=only, external=external)


async def _bring_sources(js: JetStreamContext, stream: str, wanted: list[StreamSource]) -> None:
    """The stream's leaf sources become `wanted`; sources of other kinds are kept; no update when equal."""
    config = (await js.stream_info(stream)).config
    others = [s for s in config.sources or [] if not _is_leaf_source(s)]
    current = [s for s in config.sources or [] if _is_leaf_source(s)]
    if _keys(current) != _keys(wanted):
        config.sources = [*others, *wanted] or None
        await js.update_stream(config)


def _is_leaf_source(source: StreamSource) -> bool:
    return source.external is not None and (source.external.api or "").startswith(f"$JS.{leaf_domain('')}")


def _keys(sources: list[StreamSource]) -> list[tuple[str, str]]:
    return sorted((s.external.api or "" if s.external else "", s.filter_subject or "") for s in sources)
