"""Approvals: actions the host's policy holds until someone allowed answers, kept in a JetStream KV bucket.

Each approval is one key (`<host>.<id>`) whose every change is a compare-and-set on its revision: of two
approvers answering at once exactly one moves it out of `pending`, so the action runs once. An answer
after `expires_at` is refused and the approval recorded `expired`; `sweep` expires the ones nobody
answered. The bucket outlives the agent, so a pending approval survives a restart.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import structlog
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from tuxpilot.bus.streams import bounded_bucket
from tuxpilot.protocol.approvals import Approval, ApprovalState, Decision
from tuxpilot.protocol.errors import Conflict, Forbidden, NotFound
from tuxpilot.protocol.models import now
from tuxpilot.protocol.names import Subjects, approval_key, approvals_bucket

log = structlog.get_logger("tuxpilot.approvals")

CAS_ATTEMPTS = 5


class Expired(Conflict):
    """Too late: the approval expired (an answer then is a conflict with its state, 409)."""


class ApprovalPolicy(BaseModel):
    """`[approvals]` in the host config: which actions wait for a human, for how long, and who may answer."""

    model_config = ConfigDict(extra="forbid")
    actions: list[str] = Field(default_factory=list, description='Actions ("plugin.action") that need approval.')
    permissions: list[str] = Field(default_factory=list, description="Every action needing one of these.")
    rules: list[str] = Field(default_factory=list, description="Every action these rules propose.")
    schedules: list[str] = Field(default_factory=list, description="Every action these schedules run.")
    timeout_s: Annotated[float, Field(gt=0)] = Field(3600.0, description="After this a pending approval expires.")
    timeouts: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description='timeout_s per rule, schedule or action ("plugin.action").'
    )
    approvers: list[str] = Field(
        default_factory=list,
        description="NATS users who may answer (taken from the reply inbox); empty: any user allowed to publish "
        "on the approve subjects (the operator's by default).",
    )
    keep_s: Annotated[float, Field(gt=0)] = Field(7 * 24 * 3600.0, description="How long decided approvals are kept.")


def timeout_for(policy: ApprovalPolicy, *names: str | None) -> float:
    """The first of `names` (rule or schedule, then plugin.action) given its own timeout, else the default."""
    for name in names:
        if name is not None and name in policy.timeouts:
            return policy.timeouts[name]
    return policy.timeout_s


def required(policy: ApprovalPolicy, *, key: str, permission: str | None, rule: str | None,
             schedule: str | None) -> str | None:
    """Why this action needs approval under `policy`, or None."""
    if key in policy.actions:
        return f"approval required for {key}"
    if permission is not None and permission in policy.permissions:
        return f"approval required for every {permission} action"
    if rule is not None and rule in policy.rules:
        return f"approval required for rule {rule}"
    if schedule is not None and schedule in policy.schedules:
        return f"approval required for schedule {schedule}"
    return None


class ApprovalStore:
    """The approvals bucket for one host: open, read, decide (compare-and-set), list, expire."""

    def __init__(self, nc: Client, subjects: Subjects, keep_s: float = 7 * 24 * 3600.0, replicas: int = 1, *,
                 update: bool = True):
        self.nc, self.subjects, self.keep_s, self.replicas, self.update = nc, subjects, keep_s, replicas, update
        self.next_expiry: datetime | None = None  # the earliest of those the last sweep left pending
        self.kv: KeyValue | None = None

    async def start(self) -> None:
        self.kv = await bounded_bucket(
            self.nc.jetstream(), approvals_bucket(self.subjects), max_age=self.keep_s, max_bytes=64 * 1024 * 1024,
            replicas=self.replicas, what="TuxPilot: actions held for approval, and what became of them",
            update=self.update,
        )

    def _key(self, approval_id: str) -> str:
        return approval_key(self.subjects.host, approval_id)

    async def open(self, approval: Approval) -> bool:
        """Hold an action; False when it is held already (a redelivered proposal)."""
        assert self.kv is not None
        try:
            await self.kv.create(self._key(approval.id), approval.to_json())
        except KeyWrongLastSequenceError:
            return False
        log.info("approval.pending", approval_id=approval.id, plugin=approval.plugin, action=approval.action,
                 why=approval.why)
        return True

    async def get(self, approval_id: str) -> tuple[Approval, int]:
        assert self.kv is not None
        try:
            entry = await self.kv.get(self._key(approval_id))
        except KeyNotFoundError:
            raise NotFound(f"no approval {approval_id!r} on {self.subjects.host}") from None
        assert entry.revision is not None
        return Approval.model_validate(json.loads(entry.value or b"{}")), entry.revision

    async def decide(self, approval_id: str, decision: Decision, by: str | None, at: datetime | None = None,
                     approvers: list[str] | None = None) -> Approval:
        """Move a pending approval to approved or denied; exactly one of concurrent answers wins.

        Raises NotFound, Forbidden (not an approver), Expired (too late: recorded expired) or Conflict
        (someone answered first; the message says who and how).
        """
        if approvers and by not in approvers:
            raise Forbidden(f"{by or 'an unnamed caller'} may not answer approvals on {self.subjects.host}")
        at = at or now()
        for _ in range(CAS_ATTEMPTS):
            approval, revision = await self.get(approval_id)
            if approval.state is not ApprovalState.pending:
                raise Conflict(f"approval {approval_id} is already {approval.state.value}"
                               + (f" by {approval.decided_by}" if approval.decided_by else ""))
            if approval.expired_at(at):
                if await self._set(approval, revision, ApprovalState.expired, None, at, None):
                    raise Expired(f"approval {approval_id} expired at {approval.expires_at.isoformat()}")
                continue
            state = ApprovalState.approved if decision.decision == "approve" else ApprovalState.denied
            decided = await self._set(approval, revision, state, by, at, decision.comment)
            if decided is not None:
                return decided
        raise Conflict(f"approval {approval_id} kept changing; try again")

    async def _set(self, approval: Approval, revision: int, state: ApprovalState, by: str | None, at: datetime,
                   comment: str | None) -> Approval | None:
        assert self.kv is not None
        new = approval.model_copy(update={"state": state, "decided_by": by, "decided_at": at, "comment": comment})
        try:
            await self.kv.update(self._key(approval.id), new.to_json(), last=revision)
        except KeyWrongLastSequenceError:
            return None
        log.info("approval.decided", approval_id=approval.id, state=state.value, by=by)
        return new

    async def listing(self) -> list[Approval]:
        """Every approval of this host still kept (any state), oldest request first."""
        assert self.kv is not None
        # A watch on this host's keys only (nats.py's keys(filters=) matches substrings, not subjects).
        watcher = await self.kv.watch(f"{self.subjects.host}.*", ignore_deletes=True)
        out = []
        try:
            async for entry in watcher:
                if entry is None:  # the initial values are all delivered
                    break
                try:
                    out.append(Approval.model_validate(json.loads(entry.value or b"{}")))
                except ValueError:
                    log.warning("approval.unreadable", key=entry.key)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(out, key=lambda a: a.requested_at)

    async def pending(self) -> list[Approval]:
        return [a for a in await self.listing() if a.state is ApprovalState.pending]

    async def sweep(self, at: datetime | None = None) -> list[Approval]:
        """Expire the pending approvals past their time; returns those this call expired."""
        at = at or now()
        expired = []
        self.next_expiry = None
        for approval in await self.pending():
            if not approval.expired_at(at):
                if self.next_expiry is None or approval.expires_at < self.next_expiry:
                    self.next_expiry = approval.expires_at
                continue
            try:
                current, revision = await self.get(approval.id)
            except NotFound:
                continue
            if current.state is ApprovalState.pending:
                done = await self._set(current, revision, ApprovalState.expired, None, at, None)
                if done is not None:
                    expired.append(done)
        return expired
