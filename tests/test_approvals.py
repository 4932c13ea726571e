"""The approvals bucket on a real server: pending, approve, deny, expire, two approvers racing, restart."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from nats.aio.client import Client
from tuxpilot.agent.approvals import ApprovalPolicy, ApprovalStore, Expired, required
from tuxpilot.protocol.approvals import Approval, ApprovalState, Decision
from tuxpilot.protocol.errors import Conflict, Forbidden, NotFound
from tuxpilot.protocol.models import new_id, now
from tuxpilot.protocol.names import Subjects

SUBJECTS = Subjects(prefix="tuxpilot", host="web-1")
APPROVE, DENY = Decision(decision="approve", comment="ok"), Decision(decision="deny")


def held(expires_in: float = 600.0) -> Approval:
    at = now()
    return Approval(id=new_id(), host="web-1", plugin="docker", action="prune", params={"what": "images"},
                    why="approval required for docker.prune", source="rule", proposer="prune-var",
                    requested_at=at, expires_at=at + timedelta(seconds=expires_in))


async def store(nc: Client) -> ApprovalStore:
    s = ApprovalStore(nc, SUBJECTS)
    await s.start()
    return s


async def test_approve_then_no_second_answer(nc: Client) -> None:
    s = await store(nc)
    a = held()
    assert await s.open(a) and not await s.open(a)  # a redelivered proposal holds it once
    assert [p.id for p in await s.pending()] == [a.id]
    decided = await s.decide(a.id, APPROVE, "alice")
    assert decided.state is ApprovalState.approved and decided.decided_by == "alice"
    with pytest.raises(Conflict, match="already approved by alice"):
        await s.decide(a.id, DENY, "bob")
    assert await s.pending() == []


async def test_deny_and_unknown_and_not_an_approver(nc: Client) -> None:
    s = await store(nc)
    a = held()
    await s.open(a)
    with pytest.raises(Forbidden):
        await s.decide(a.id, APPROVE, "mallory", approvers=["alice"])
    assert (await s.decide(a.id, DENY, "alice", approvers=["alice"])).state is ApprovalState.denied
    with pytest.raises(NotFound):
        await s.decide("nope", APPROVE, "alice")


async def test_expired_is_refused_and_swept(nc: Client) -> None:
    s = await store(nc)
    late, idle = held(), held()
    await s.open(late)
    await s.open(idle)
    later = now() + timedelta(seconds=601)
    with pytest.raises(Expired):
        await s.decide(late.id, APPROVE, "alice", at=later)
    assert (await s.get(late.id))[0].state is ApprovalState.expired
    assert [a.id for a in await s.sweep(later)] == [idle.id]
    assert await s.pending() == []


async def test_two_approvers_at_once_one_wins(nc: Client) -> None:
    s1, s2 = await store(nc), await store(nc)  # two agents' stores on one bucket
    for _ in range(5):
        a = held()
        await s1.open(a)
        outcomes = await asyncio.gather(s1.decide(a.id, APPROVE, "alice"), s2.decide(a.id, APPROVE, "bob"),
                                        return_exceptions=True)
        assert sum(isinstance(o, Approval) for o in outcomes) == 1
        assert sum(isinstance(o, Conflict) for o in outcomes) == 1


async def test_pending_survives_a_new_connection(nc: Client, nats_server: object) -> None:
    s = await store(nc)
    a = held()
    await s.open(a)
    other = Client()
    await other.connect(nc.connected_url.geturl() if nc.connected_url else "")
    try:
        again = await store(other)
        assert [p.id for p in await again.pending()] == [a.id]
    finally:
        await other.close()


def test_policy_says_why() -> None:
    policy = ApprovalPolicy(actions=["docker.prune"], permissions=["service_management"], rules=["r"])
    assert required(policy, key="docker.prune", permission=None, rule=None, schedule=None)
    assert "service_management" in (required(policy, key="x.y", permission="service_management", rule=None,
                                             schedule=None) or "")
    assert required(policy, key="x.y", permission=None, rule="r", schedule=None)
    assert required(policy, key="x.y", permission="network_access", rule=None, schedule=None) is None
