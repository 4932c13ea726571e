"""Fleet concurrency limits: at most K hosts (or K % of the alive ones) of a group run one action at once.

A host about to run a limited action writes its lease under its own key `<group>.<host>` of the
`<prefix>_leases` bucket, with a per-message TTL (the lease time), then reads the group's live leases:
it holds one when fewer than K of them were stored before its own (stream sequence order, the same
for every reader). Otherwise it takes its lease back and the gate refuses the action (`fleet_limit`).
Two hosts racing can at worst both step back; never can more than K proceed. A host that dies holding
a lease blocks no one for longer than its TTL: the server drops the message then. Each host's key
template lets it write only keys ending in its own id, and the bucket allows no rollup (one of which
would purge every key), so no host can take or drop another's lease.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.client import KV_STREAM_TEMPLATE
from nats.js.errors import NotFoundError

from tuxpilot.bus.streams import bucket_entries, ensure_leases_bucket
from tuxpilot.fleet.heartbeat import Beat, judge
from tuxpilot.protocol.manifest import FleetLimit
from tuxpilot.protocol.names import Subjects, fleet_bucket, lease_group, lease_key, leases_bucket

log = structlog.get_logger("tuxpilot.leases")

MARKER_TTL_S = 60.0  # a released lease's delete marker goes away by itself
KV_TIMEOUT_S = 2.0


class LeaseRefused(Exception):
    def __init__(self, message: str, details: dict[str, Any]):
        super().__init__(message)
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Lease:
    group: str
    subject: str
    seq: int


def group_labels(limit: FleetLimit, labels: dict[str, str]) -> dict[str, str] | None:
    """The labels that name this host's group under `limit`, or None when the host is not in one (the
    limit does not apply to it)."""
    if any(labels.get(k) != v for k, v in limit.labels.items()):
        return None
    return {**limit.labels, **{k: labels.get(k, "") for k in limit.group_by}}


def allowed(limit: FleetLimit, members: int) -> int:
    """K: the limit's `max`, or its `percent` of the group's members, at least one."""
    if limit.max is not None:
        return limit.max
    assert limit.percent is not None
    return max(1, math.floor(members * limit.percent / 100))


@dataclass
class _Held:
    lease: Lease
    first: int  # the stream sequence of its first write: its place in the group's order
    count: int  # this host's runs under it now
    until: float  # monotonic time its TTL ends


def _place(data: bytes | None, seq: int) -> int:
    """A lease's place in its group's order: its first write's sequence (never later than this one's)."""
    try:
        first = json.loads(data or b"{}").get("first")
    except (ValueError, AttributeError):
        return seq
    return first if isinstance(first, int) and 0 < first < seq else seq


class Leases:
    """This host's side of the fleet's leases."""

    def __init__(self, nc: Client, subjects: Subjects, labels: dict[str, str], *, create: bool):
        self.nc = nc
        self.subjects = subjects
        self.labels = labels
        self.create = create  # a fleet's hosts may not create the bucket: their administrator did
        self.bucket = leases_bucket(subjects)
        self.stream = KV_STREAM_TEMPLATE.format(bucket=self.bucket)
        self._ready = False
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _ensure(self, js: JetStreamContext) -> None:
        if self._ready:
            return
        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            if not self.create:
                raise
            await ensure_leases_bucket(js, self.subjects)
        self._ready = True

    async def members(self, js: JetStreamContext, group: dict[str, str]) -> int:
        """Alive hosts of the group, by their heartbeats (this host counts, beating or not)."""
        try:
            beats = await bucket_entries(js, fleet_bucket(self.subjects), limit_s=KV_TIMEOUT_S)
        except (NotFoundError, TimeoutError):
            return 1
        hosts = {self.subjects.host}
        for host, raw in beats.items():
            try:
                beat = Beat.model_validate_json(raw)
            except ValueError:
                continue
            if judge(host, beat.labels, beat).state == "alive" and all(
                beat.labels.get(k) == v for k, v in group.items()
            ):
                hosts.add(host)
        return len(hosts)

    async def acquire(self, plugin: str, action: str, limit: FleetLimit, action_timeout_s: float,
                      action_id: str) -> Lease | None:
        """A lease for this run of the action, None when the limit does not apply to this host; raises
        LeaseRefused when K hosts of the group hold one already (or the leases cannot be reached). The limit
        counts hosts: a host holding its group's lease runs its other cases of the action under it."""
        group = group_labels(limit, self.labels)
        if group is None:
            return None
        name = lease_group(plugin, action, group)
        lease_s = float(limit.lease_s or action_timeout_s)
        details: dict[str, Any] = {"group": group, "lease_s": lease_s, "limit_key": name}
        async with self._locks.setdefault(name, asyncio.Lock()):
            held = self._held.get(name)
            # Under a lease still alive, this case joins it, which is renewed for as long as this run (its
            # place kept). A lease that lapsed is no place to keep: others may hold it now, so it is taken
            # afresh like anyone's.
            if held is not None and held.count > 0 and held.until > time.monotonic():
                try:
                    await self._write(name, action_id, lease_s, held.first)
                except Exception as exc:
                    raise LeaseRefused(f"{plugin}.{action} has a fleet limit and its lease could not be renewed "
                                       f"({type(exc).__name__}: {str(exc)[:200]})", details) from None
                held.count += 1
                held.until = time.monotonic() + lease_s
                return held.lease
            running = held.count if held is not None else 0
            js = self.nc.jetstream(timeout=KV_TIMEOUT_S)
            try:
                await self._ensure(js)
                k = allowed(limit, await self.members(js, group) if limit.percent is not None else 1)
                details["limit"] = k
                started = time.monotonic()
                seq = await self._write(name, action_id, lease_s, None)
                earlier = await self._holders(js, name, before=seq)
            except Exception as exc:  # the bucket is missing or the server away: not run without a lease
                raise LeaseRefused(f"{plugin}.{action} has a fleet limit and its lease could not be taken "
                                   f"({type(exc).__name__}: {str(exc)[:200]})", details) from None
            lease = Lease(name, self._subject(name), seq)
            if len(earlier) >= k:
                await self._delete(lease)
                details["holders"] = sorted(earlier)
                raise LeaseRefused(f"{len(earlier)} host(s) of its group run {plugin}.{action} now, its fleet "
                                   f"limit is {k}: {', '.join(sorted(earlier))}", details)
            self._held[name] = _Held(lease, seq, running + 1, started + lease_s)
            log.info("lease.taken", group=name, seq=seq, limit=k, before=len(earlier))
            return lease

    def _subject(self, group: str) -> str:
        return f"$KV.{self.bucket}.{lease_key(group, self.subjects.host)}"

    async def _write(self, group: str, action_id: str, lease_s: float, first: int | None) -> int:
        """Our lease in `group`, living `lease_s`; `first` (a renewal) keeps its place in the order."""
        body = {"host": self.subjects.host, "action_id": action_id, "at": time.time(), "lease_s": lease_s}
        if first is not None:
            body["first"] = first
        ack = await self.nc.jetstream(timeout=KV_TIMEOUT_S).publish(
            self._subject(group), json.dumps(body).encode(), msg_ttl=math.ceil(lease_s))
        return int(ack.seq)

    async def _holders(self, js: JetStreamContext, group: str, *, before: int) -> list[str]:
        """The other hosts whose live lease in `group` was first taken before sequence `before` (a renewed
        lease keeps the place of its first write, which its value names)."""
        prefix = f"$KV.{self.bucket}.{group}."
        holders: list[str] = []
        seq = 1
        while True:
            try:
                msg = await js.get_msg(self.stream, seq=seq, subject=prefix + "*", next=True)
            except NotFoundError:
                break
            if msg.seq is None:
                break
            host = (msg.subject or "").removeprefix(prefix)
            live = (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")
            if host != self.subjects.host and live and _place(msg.data, msg.seq) < before:
                holders.append(host)
            seq = msg.seq + 1
        return holders

    async def release(self, lease: Lease) -> None:
        """One run under the lease is done; the last one gives it back at once (a delete marker on our key;
        if that fails the TTL still ends it)."""
        async with self._locks.setdefault(lease.group, asyncio.Lock()):
            held = self._held.get(lease.group)
            if held is not None:
                held.count -= 1
                if held.count > 0:
                    return
                del self._held[lease.group]
            await self._delete(lease)

    async def _delete(self, lease: Lease) -> None:
        try:
            await self.nc.jetstream(timeout=KV_TIMEOUT_S).publish(
                lease.subject, b"", headers={"KV-Operation": "DEL"}, msg_ttl=MARKER_TTL_S)
        except Exception as exc:  # the TTL frees it anyway
            log.warning("lease.release_failed", group=lease.group, error=f"{type(exc).__name__}: {exc}"[:200])
