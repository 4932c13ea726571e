"""What the fleet's administrator keeps on the hub: the shared bucket no host may create (the leases), the
heartbeats bucket, and the audit stream's sources, one per leaf host (see `fleet/leaf.py`)."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ExternalStream, StreamSource
from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.errors import NotFoundError

from tuxpilot.bus.streams import ensure_leases_bucket, ensure_streams, replicas_for
from tuxpilot.fleet.admin import Fleet
from tuxpilot.fleet.heartbeat import open_heartbeats
from tuxpilot.protocol.names import Names, Subjects, fleet_bucket, leaf_deliver, leaf_domain
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
    hosts = [host for host, record in sorted(fleet.hosts.items()) if record.leaf and not record.revoked]
    await _bring_sources(js, Names.of(subjects).audit, [_source(subjects, h, Names.of(subjects).audit,
                                                                 subjects.results(h)) for h in hosts])
    beats = KV_STREAM_TEMPLATE.format(bucket=fleet_bucket(subjects))
    await _bring_sources(js, beats, [_source(subjects, h, beats, f"$KV.{fleet_bucket(subjects)}.{h}") for h in hosts])
    return [leaf_domain(h) for h in hosts]


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
