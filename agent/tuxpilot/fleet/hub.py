"""What the fleet's administrator keeps on the hub: the shared bucket no host may create (the leases), and
the audit stream's sources, one per leaf host (see `fleet/leaf.py`)."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ExternalStream, StreamSource
from nats.js.errors import NotFoundError

from tuxpilot.bus.streams import ensure_leases_bucket, ensure_streams, replicas_for
from tuxpilot.fleet.admin import Fleet
from tuxpilot.protocol.names import Names, Subjects, leaf_deliver, leaf_domain
from tuxpilot.settings import StreamsConfig


async def prepare(nc: Client, fleet: Fleet, cfg: StreamsConfig | None = None) -> list[str]:
    """Bring the hub to the roster: the leases bucket exists, the audit stream sources every leaf host.
    Returns the leaf domains sourced."""
    cfg = cfg or StreamsConfig()
    cfg = cfg.model_copy(update={"replicas": replicas_for(nc, cfg)})
    js = nc.jetstream()
    await ensure_leases_bucket(js, Subjects(fleet.prefix, "hub"), cfg.replicas)
    return await source_leaves(js, fleet, cfg)


def leaf_sources(fleet: Fleet) -> list[StreamSource]:
    """The hub audit stream's sources: each unrevoked leaf host's audit stream, in its own domain,
    delivered on that host's own subject."""
    subjects = Subjects(fleet.prefix, "hub")
    audit = Names.of(subjects).audit
    return [
        StreamSource(name=audit, external=ExternalStream(api=f"$JS.{leaf_domain(host)}.API",
                                                         deliver=leaf_deliver(subjects, host)))
        for host, record in sorted(fleet.hosts.items()) if record.leaf and not record.revoked
    ]


async def source_leaves(js: JetStreamContext, fleet: Fleet, cfg: StreamsConfig) -> list[str]:
    """Bring the hub's audit stream's sources to the roster's leaf hosts (creating the stream if no agent
    has yet); returns the domains sourced. Sources of other kinds are kept."""
    subjects = Subjects(fleet.prefix, "hub")
    audit = Names.of(subjects).audit
    try:
        info = await js.stream_info(audit)
    except NotFoundError:
        await ensure_streams(js, subjects, cfg, update=False)
        info = await js.stream_info(audit)
    config = info.config
    wanted = leaf_sources(fleet)
    others = [s for s in config.sources or [] if not _is_leaf_source(s)]
    current = [s for s in config.sources or [] if _is_leaf_source(s)]
    if _apis(current) != _apis(wanted):
        config.sources = [*others, *wanted] or None
        await js.update_stream(config)
    return [leaf_domain(host) for host, record in sorted(fleet.hosts.items()) if record.leaf and not record.revoked]


def _is_leaf_source(source: StreamSource) -> bool:
    return source.external is not None and (source.external.api or "").startswith(f"$JS.{leaf_domain('')}")


def _apis(sources: list[StreamSource]) -> list[str]:
    return sorted(s.external.api or "" for s in sources if s.external is not None)
