"""The approval documents on the wire: the request the gate announces, and an approver's answer."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field

from tuxpilot.protocol.models import Doc, Id, Token


class ApprovalState(StrEnum):
    pending = "pending"
    approved = "approved"
    denied = "denied"
    expired = "expired"


class Approval(Doc):
    """An action held by the gate until someone allowed answers; the id is the action id."""

    id: Id
    host: Token
    state: ApprovalState = ApprovalState.pending
    plugin: Token
    action: Token
    params: dict[str, Any] = Field(default_factory=dict)
    why: Annotated[str, Field(max_length=1024)] = Field(description="The policy that asks for approval.")
    reason: Annotated[str, Field(max_length=1024)] | None = Field(None, description="Why the action was asked.")
    proposer: Annotated[str, Field(max_length=256)] | None = None
    source: Annotated[str, Field(max_length=32)]
    caller: Annotated[str, Field(max_length=256)] | None = None
    event_id: Id | None = None
    resource: Annotated[str, Field(max_length=1024)] | None = None
    requested_at: AwareDatetime
    expires_at: AwareDatetime
    decided_by: Annotated[str, Field(max_length=256)] | None = None
    decided_at: AwareDatetime | None = None
    comment: Annotated[str, Field(max_length=1024)] | None = None
    # What the gate needs to resume the action after an approval, in a restarted agent too.
    resume: dict[str, Any] = Field(default_factory=dict)

    def expired_at(self, at: datetime) -> bool:
        return at >= self.expires_at


class Decision(Doc):
    """What an approver sends to `P.approve.H.<id>`."""

    decision: Literal["approve", "deny"]
    comment: Annotated[str, Field(max_length=1024)] | None = None
