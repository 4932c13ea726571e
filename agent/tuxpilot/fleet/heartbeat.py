"""Heartbeats: each agent's key in the `<prefix>_fleet` bucket, and what a roster makes of them.

A beat says who the host is and how it is (version, labels, plugins and their state, last event, last
error) and when; a host whose last beat is older than its own `ttl_s` is lost. The bucket keeps each
key for a day (max_age), so a host lost for longer reads as never seen again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from tuxpilot.protocol.names import Subjects, fleet_bucket

KEEP_S = 24 * 3600.0


class Beat(BaseModel):
    host: str
    version: str
    labels: dict[str, str] = Field(default_factory=dict)
    plugins: dict[str, str] = Field(default_factory=dict, description="plugin → its state")
    last_event: str | None = None
    last_error: str | None = None
    started: float
    at: float = Field(description="Unix time of this beat.")
    ttl_s: float = Field(description="Lost when no beat came for this long.")


async def open_heartbeats(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> KeyValue:
    name = fleet_bucket(subjects)
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=name, history=1, ttl=KEEP_S, replicas=replicas,
                                         description="TuxPilot heartbeats: one key per host")


async def read_beat(kv: KeyValue, host: str) -> Beat | None:
    try:
        entry = await kv.get(host)
    except KeyNotFoundError:
        return None
    try:
        return Beat.model_validate_json(entry.value or b"")
    except ValueError:
        return None


@dataclass(frozen=True)
class HostStatus:
    host: str
    state: str  # alive, lost, never seen
    labels: dict[str, str]
    beat: Beat | None

    def doc(self) -> dict[str, Any]:
        return {"host": self.host, "state": self.state, "labels": self.labels,
                "beat": self.beat.model_dump() if self.beat else None}


def judge(host: str, labels: dict[str, str], beat: Beat | None, now: float | None = None) -> HostStatus:
    if beat is None:
        return HostStatus(host, "never seen", labels, None)
    age = (now if now is not None else time.time()) - beat.at
    return HostStatus(host, "alive" if age <= beat.ttl_s else "lost", labels or beat.labels, beat)
