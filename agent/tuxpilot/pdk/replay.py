"""`tuxpilot plugin test PATH --replay 24h --server URL`: a fleet's stored events through this version of a
plugin, in shadow mode, against what the fleet's audit trail shows was proposed and decided.

Shadow mode: the plugin runs on a private embedded server and agent (tuxpilot.pdk.embedded) whose gate
keeps every action dry; the fleet is only read (events and audit, by direct get: operators may read
streams but create no consumer there). Each event is stored again on the private server with its own
id, so the proposal the plugin makes has the id the fleet's would have had (`<event id>-<plugin>`) and
is compared with the fleet's records of that event, per event type.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from tuxpilot.agent.audit import read_stream
from tuxpilot.pdk.embedded import embedded
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Names, Subjects

MAX_EVENTS = 20_000  # a replay of more would not be read by anyone; say so instead
SETTLE_S = 0.5
HANDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Proposed:
    """One proposed action: what, with which params, and (from the audit) what the gate decided."""

    action: str
    params: dict[str, Any]
    decided: str | None = None  # the audit record's status: ok, refused, dry_run, …

    @property
    def key(self) -> str:
        return f"{self.action} {json.dumps(self.params, sort_keys=True, separators=(',', ':'))}"


@dataclass
class EventDiff:
    event: Event
    before: list[Proposed]  # from the fleet's audit trail
    after: list[Proposed]  # from this version, in shadow mode

    @property
    def kind(self) -> str:
        """same, changed, new (proposed only now), gone (proposed only before), none (neither proposed)."""
        if not self.before and not self.after:
            return "none"
        if not self.before:
            return "new"
        if not self.after:
            return "gone"
        return "same" if sorted(p.key for p in self.before) == sorted(p.key for p in self.after) else "changed"


@dataclass
class ReplayResult:
    plugin: str
    version: str
    since: datetime
    diffs: list[EventDiff] = field(default_factory=list)
    truncated: bool = False
    unhandled: int = 0  # events the plugin did not ack within the time given (failed or hung)

    def by_type(self) -> dict[str, list[EventDiff]]:
        found: dict[str, list[EventDiff]] = {}
        for diff in self.diffs:
            found.setdefault(diff.event.type, []).append(diff)
        return dict(sorted(found.items()))

    def to_doc(self) -> dict[str, Any]:
        def side(items: list[Proposed]) -> list[dict[str, Any]]:
            return [{"action": p.action, "params": p.params, **({"decided": p.decided} if p.decided else {})}
                    for p in items]

        return {
            "plugin": self.plugin, "version": self.version, "since": self.since.isoformat(),
            "events": len(self.diffs), "truncated": self.truncated, "unhandled": self.unhandled,
            "types": {
                kind: {
                    "counts": _counts(diffs),
                    "events": [{"event_id": d.event.id, "host": d.event.host, "time": d.event.time.isoformat(),
                                "kind": d.kind, "before": side(d.before), "after": side(d.after)}
                               for d in diffs],
                }
                for kind, diffs in self.by_type().items()
            },
        }


def _counts(diffs: list[EventDiff]) -> dict[str, int]:
    counts = dict.fromkeys(("same", "changed", "new", "gone", "none"), 0)
    for d in diffs:
        counts[d.kind] += 1
    return counts


async def read_events(nc: Client, subjects: Subjects, patterns: list[str], since: datetime,
                      ) -> tuple[list[Event], bool]:
    """The events of every host that match `patterns`, from `since`, oldest first (at most MAX_EVENTS)."""
    found: dict[str, Event] = {}
    truncated = False
    stream = Names.of(subjects).events
    for pattern in patterns:
        async for body in read_stream(nc, stream, subjects.events(pattern, host="*"), since=since):
            with contextlib.suppress(ValueError):
                event = Event.model_validate_json(body)
                if any(fnmatch.fnmatchcase(event.type, p) for p in patterns):
                    found.setdefault(event.id, event)
            if len(found) >= MAX_EVENTS:
                truncated = True
                break
    return sorted(found.values(), key=lambda e: e.time), truncated


async def read_decisions(nc: Client, subjects: Subjects, plugin: str, since: datetime,
                         ) -> dict[str, list[Proposed]]:
    """What the audit trail shows was proposed by `plugin` for each event, and decided."""
    found: dict[str, list[Proposed]] = {}
    subject = f"{subjects.prefix}.result.*.{plugin}.*"
    async for body in read_stream(nc, Names.of(subjects).audit, subject, since=since):
        try:
            doc = json.loads(body)
        except ValueError:
            continue
        if not isinstance(doc, dict) or not doc.get("event_id") or doc.get("source") not in (None, "proposal"):
            continue
        if doc.get("proposed_by") not in (None, plugin) or not isinstance(doc.get("action"), str):
            continue
        params = doc.get("params")
        params = params if isinstance(params, dict) else {}
        found.setdefault(str(doc["event_id"]), []).append(Proposed(doc["action"], params, doc.get("status")))
    return found


async def replay(
    fleet: Client,
    fleet_subjects: Subjects,
    folder: Path,
    since: datetime,
    *,
    echo: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> ReplayResult:
    """Replay the fleet's events since `since` through the plugin in `folder`, in shadow mode."""
    say = echo or (lambda _line: None)
    manifest = load_manifest(folder)
    result = ReplayResult(manifest.name, manifest.version, since)
    events, result.truncated = await read_events(fleet, fleet_subjects, manifest.subscribes, since)
    decisions = await read_decisions(fleet, fleet_subjects, manifest.name, since)
    say(f"read {len(events)} events of {', '.join(manifest.subscribes) or 'no type'} since {since.isoformat()} "
        f"and {sum(map(len, decisions.values()))} audit records of {manifest.name}")
    after: dict[str, list[Proposed]] = {}
    quiet = {} if verbose else {"TUXPILOT_LOG_LEVEL": "error"}
    async with embedded(folder, dry_run=True, extra=quiet) as rig:
        say(f"shadow: {manifest.name} {manifest.version} on a private server ({rig.url}), nothing executed")

        async def seen(msg: Msg) -> None:
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                doc = json.loads(msg.data)
                after[str(doc["event_id"])] = [
                    Proposed(a["action"], a.get("params") or {}) for a in doc.get("actions") or []
                    if a.get("plugin", manifest.name) == manifest.name
                ]

        sub = await rig.operator.subscribe(rig.subjects.proposal(manifest.name), cb=seen)
        handed = await rig.operator.subscribe(rig.subjects.handoff(manifest.name), cb=seen)
        try:
            last = 0
            for event in events:
                last = await rig.publish_event(event)
            result.unhandled = await _wait_handled(rig, last, len(events))
            await asyncio.sleep(SETTLE_S)  # the last proposals' deliveries to our subscription
        finally:
            await sub.unsubscribe()
            await handed.unsubscribe()
    result.diffs = [EventDiff(e, decisions.get(e.id, []), after.get(e.id, [])) for e in events]
    return result


async def _wait_handled(rig: Any, last_seq: int, count: int) -> int:
    """Wait until the plugin acked everything up to `last_seq`; how many it left unacked in the end."""
    if count == 0:
        return 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDLE_TIMEOUT_S
    while True:
        info = await rig.consumer()
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        if floor >= last_seq and info.num_ack_pending == 0:
            return 0
        if loop.time() > deadline:
            return int(info.num_ack_pending + info.num_pending)
        await asyncio.sleep(0.1)


def render(result: ReplayResult, *, examples: int = 5) -> list[str]:
    """The diff per event type, as lines: counts, then up to `examples` events of each kind that differs."""
    lines = [f"replay of {result.plugin} {result.version}: {len(result.diffs)} events since "
             f"{result.since.isoformat(timespec='seconds')}"
             + (f" (only the first {MAX_EVENTS})" if result.truncated else "")]
    if result.unhandled:
        lines.append(f"warning: {result.unhandled} events were not handled (the plugin failed or hung on them)")
    marks = {"changed": "~", "new": "+", "gone": "-"}
    for event_type, diffs in result.by_type().items():
        counts = _counts(diffs)
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        lines.append(f"{event_type}: {len(diffs)} events: {summary}")
        for kind, mark in marks.items():
            for d in [d for d in diffs if d.kind == kind][:examples]:
                was = "; ".join(f"{p.key} ({p.decided})" if p.decided else p.key for p in d.before) or "nothing"
                now = "; ".join(p.key for p in d.after) or "nothing"
                lines.append(f"  {mark} {d.event.time.isoformat(timespec='seconds')} {d.event.host} "
                             f"{d.event.id}: was {was}; now {now}")
    if not result.diffs:
        lines.append("no events of the types it subscribes to in that time")
    return lines
