"""The documents on the wire (event, proposal, result, error, metrics) as pydantic models.

They mirror `schemas/*.json`; tests/test_models.py proves the two agree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

Token = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")]
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
EventType = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}\.[a-z0-9_-]{1,64}$")]
Severity = Literal["info", "warning", "critical"]


class Status(StrEnum):
    """What became of an action; result.json lists the same values."""

    ok = "ok"
    error = "error"  # the plugin ran it and failed; `reason` is the plugin's error code
    refused = "refused"
    suppressed = "suppressed"
    dry_run = "dry_run"
    timeout = "timeout"
    unavailable = "unavailable"
    expired = "expired"
    duplicate = "duplicate"
    dead_letter = "dead_letter"
    pending = "pending"  # held until someone allowed approves it (or it expires)


class Reason(StrEnum):
    """Why TuxPilot itself stopped or failed an action (every status but `ok`, and `error` when the gate,
    not the plugin, failed); result.json lists the same values. A plugin's own error codes are not here."""

    # the proposal as a whole
    bad_request = "bad_request"
    invalid_params = "invalid_params"
    payload_too_large = "payload_too_large"
    impersonation = "impersonation"
    rate_limited = "rate_limited"
    no_caller = "no_caller"
    # owner, params, event
    foreign_action = "foreign_action"
    unknown_plugin = "unknown_plugin"
    unknown_action = "unknown_action"
    event_expired = "event_expired"
    # authorisation and policy
    permission_not_granted = "permission_not_granted"
    already_claimed = "already_claimed"
    cooldown = "cooldown"
    fleet_limit = "fleet_limit"  # as many hosts of its group as its fleet limit allows run the action now
    dry_run_mode = "dry_run_mode"
    # execution
    no_responders = "no_responders"
    timeout = "timeout"
    bad_reply = "bad_reply"
    internal = "internal"
    unrecordable = "unrecordable"
    conflict = "conflict"
    max_deliveries = "max_deliveries"
    # approvals
    approval_required = "approval_required"
    approval_denied = "approval_denied"
    approval_expired = "approval_expired"
    missed_run = "missed_run"  # a schedule's run older than its misfire grace when the agent came back


class Source(StrEnum):
    """Who asked for an action: a plugin's proposal, a call on the public action endpoint, a rule, a schedule."""

    proposal = "proposal"
    operator = "operator"
    rule = "rule"
    schedule = "schedule"


# Statuses whose reason is always one of `Reason` (an `error` may carry a plugin's own code instead).
GATE_STATUSES = frozenset(Status) - {Status.ok, Status.error}
ReasonText = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(UTC)


class Doc(BaseModel):
    """A wire document: unknown fields are refused, as the schemas refuse them."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class Event(Doc):
    """Parsed events must carry id, time and severity, as the schema says; `Event.new` fills them."""

    id: Id
    type: EventType
    host: Token
    time: AwareDatetime
    severity: Severity
    source: Token | None = None
    value: FiniteFloat | None = None
    threshold: FiniteFloat | None = None
    unit: Annotated[str, Field(max_length=32)] | None = None
    resource: Annotated[str, Field(max_length=1024)] | None = None
    ttl: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def new(cls, type: str, host: str, *, severity: Severity = "warning", **fields: Any) -> Event:
        """A fresh event: a new id, the current time."""
        return cls(id=new_id(), type=type, host=host, time=now(), severity=severity, **fields)

    @property
    def category(self) -> str:
        return self.type.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.type.split(".", 1)[1]

    def expired(self, at: datetime | None = None) -> bool:
        if self.ttl is None:
            return False
        return ((at or now()) - self.time).total_seconds() > self.ttl


class ProposedAction(Doc):
    plugin: Token
    action: Token
    params: dict[str, Any] = Field(default_factory=dict)
    reason: Annotated[str, Field(max_length=1024)] | None = None
    resource: Annotated[str, Field(max_length=1024)] | None = None


class Proposal(Doc):
    id: Id = Field(default_factory=new_id)
    event_id: Id
    plugin: Token
    time: AwareDatetime = Field(default_factory=now)
    event: Event | None = None
    actions: Annotated[list[ProposedAction], Field(min_length=1, max_length=32)]


class ErrorDoc(Doc):
    code: ReasonText
    message: Annotated[str, Field(max_length=4096)]
    details: dict[str, Any] | None = None


class Artifact(Doc):
    name: Annotated[str, Field(max_length=256)]
    media_type: Annotated[str, Field(max_length=128)] | None = None
    content: str | None = None
    url: str | None = None


class Result(Doc):
    id: Id | None = None
    status: Status
    reason: ReasonText | None = None
    message: Annotated[str, Field(max_length=4096)] | None = None
    data: Any = None
    artifacts: list[Artifact] | None = None
    error: ErrorDoc | None = None
    host: Token | None = None
    plugin: Token | None = None
    action: Token | None = None
    params: dict[str, Any] | None = None
    params_bytes: Annotated[int, Field(ge=0)] | None = None
    params_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    event_id: Annotated[str, Field(max_length=128)] | None = None
    proposal_id: Annotated[str, Field(max_length=128)] | None = None
    proposed_by: Annotated[str, Field(max_length=64)] | None = None
    source: Source | None = None
    caller: Annotated[str, Field(max_length=256)] | None = None
    late: bool | None = None
    approved_by: Annotated[str, Field(max_length=256)] | None = None
    time: AwareDatetime | None = None
    duration_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _reason_of_status(self) -> Self:
        if self.reason is not None and self.status in GATE_STATUSES and self.reason not in Reason.__members__:
            raise ValueError(f"reason {self.reason!r} is not one of TuxPilot's reasons for status {self.status}")
        return self


Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Bytes = Annotated[int, Field(ge=0)]


class Usage(Doc):
    total: Bytes
    used: Bytes
    available: Bytes | None = None
    percent: Percent


class DiskUsage(Doc):
    mountpoint: str
    device: str | None = None
    fstype: str | None = None
    total: Bytes
    used: Bytes
    available: Bytes | None = None
    percent: Percent


class GateLoad(Doc):
    """How much work a host's gate has: proposals stored and not yet decided, actions running."""

    pending: Annotated[int, Field(ge=0)]
    in_flight: Annotated[int, Field(ge=0)]


class Metrics(Doc):
    host: Token
    time: AwareDatetime = Field(default_factory=now)
    cpu_percent: Percent
    cpu_count: Annotated[int, Field(ge=1)] | None = None
    load: Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
    memory: Usage
    swap: Usage
    disks: list[DiskUsage]
    uptime_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    gate: GateLoad | None = None
