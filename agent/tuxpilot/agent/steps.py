"""The gate's checks, as an ordered list of steps with one signature.

Each step takes the gate's policy and one `Case` (an action on its way through the gate) and either
returns, having perhaps noted something on the case, or raises `Stop` saying why the action goes no
further. A proposal and an operator's call go through the same list; a step that applies to only one
of them says so itself. New checks (approvals, rules, metrics) are new steps inserted in the list.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuxpilot.agent.config import Config
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import ActionSpec, Manifest
from tuxpilot.protocol.models import Event, Proposal, Reason, Source, Status


class Stop(Exception):
    """A step's verdict that this action goes no further, and why."""

    def __init__(self, status: Status, reason: Reason, message: str, error: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.error = error


@dataclass
class Case:
    """One action on its way through the gate: what is asked, by whom, and what the steps found."""

    source: Source
    plugin: str  # the plugin that owns the action (the proposal's or the called endpoint's)
    action: str
    params: dict[str, Any]
    id: str  # the action id: the plugin gets it, the ledger claims it, the audit record carries it
    proposer: str | None = None  # proposals: the plugin nats-server let publish on its proposal subject
    caller: str | None = None  # operator calls: the user whose reply inbox the call named
    proposal: Proposal | None = None
    resource: str | None = None
    started: float = field(default_factory=time.perf_counter)
    manifest: Manifest | None = None
    spec: ActionSpec | None = None
    # A verdict held back by one step for a later one (a manifest dry run is paced by the cooldown).
    deferred: Stop | None = None
    reply: Any = None  # the plugin's reply message, once it ran
    approved_by: str | None = None  # set when an approver released this case from `pending`
    lease: Any = None  # its fleet lease while it runs (agent/leases.py), given back once done

    @property
    def key(self) -> str:
        return f"{self.plugin}.{self.action}"

    @property
    def event(self) -> Event | None:
        return self.proposal.event if self.proposal is not None else None

    @property
    def event_id(self) -> str | None:
        return self.proposal.event_id if self.proposal is not None else None


class Policy(Protocol):
    """What the steps may ask of the gate: its config, its manifests, its memory of claims and cooldowns."""

    @property
    def config(self) -> Config: ...

    def manifest(self, plugin: str) -> Manifest | None: ...

    async def claim(self, case: Case) -> dict[str, Any] | None: ...

    async def cooldown(self, key: str, pause: float) -> float | None: ...

    async def hold(self, case: Case) -> str | None: ...

    async def lease(self, case: Case) -> tuple[str, dict[str, Any]] | None: ...


Step = Callable[[Policy, Case], Awaitable[None]]


# -- pure helpers --------------------------------------------------------------------------------


def action_id(event_id: str, plugin: str, action: str, params: dict[str, Any]) -> str:
    """Deterministic: the same event asking the same action with the same params is the same action."""
    key = json.dumps([event_id, plugin, action, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def params_digest(params: dict[str, Any]) -> tuple[int, str]:
    """Size and sha256 of params as canonical JSON: what a record keeps of params too large to copy."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return len(text), hashlib.sha256(text).hexdigest()


def cooldown_for(config: Config, spec: ActionSpec, key: str) -> float:
    configured = config.gate.cooldowns.get(key)
    if configured is not None:
        return configured
    return spec.cooldown_s if spec.cooldown_s is not None else config.gate.cooldown_s


def cooldown_key(case: Case) -> str:
    event = case.event
    resource = case.resource or (event.resource if event else None) or ""
    return f"{case.key}:{resource}"


@dataclass
class Cooldowns:
    """When each (plugin.action, resource) last ran; a pure clock-in structure."""

    last: dict[str, float] = field(default_factory=dict)

    def claim(self, key: str, at: float, cooldown_s: float) -> float | None:
        """Take the slot and return None, or return the seconds still to wait."""
        previous = self.last.get(key)
        if previous is not None and at - previous < cooldown_s:
            return cooldown_s - (at - previous)
        self.last[key] = at
        return None


# -- the steps, in order -------------------------------------------------------------------------


async def check_proposer(gate: Policy, case: Case) -> None:
    """A proposal speaks for the plugin whose subject it came on, and only for that plugin's actions."""
    if case.source is not Source.proposal or case.proposal is None:
        return
    if case.proposal.plugin != case.proposer:
        raise Stop(
            Status.refused,
            Reason.impersonation,
            f"a proposal on {case.proposer}'s subject claims to come from {case.proposal.plugin!r}; "
            "the proposer is whoever nats-server let publish there",
        )
    if case.plugin != case.proposer:
        raise Stop(
            Status.refused,
            Reason.foreign_action,
            f"plugin {case.proposer!r} may only propose its own actions, not {case.key}",
        )


async def check_owner(gate: Policy, case: Case) -> None:
    """The plugin is one this host loaded itself, and its manifest declares the action."""
    manifest = gate.manifest(case.plugin)
    if manifest is None:
        raise Stop(Status.refused, Reason.unknown_plugin, f"no plugin {case.plugin!r} is installed on this host")
    spec = manifest.actions.get(case.action)
    if spec is None:
        known = ", ".join(sorted(manifest.actions)) or "none"
        raise Stop(
            Status.refused, Reason.unknown_action, f"{case.plugin} has no action {case.action!r} (it has: {known})"
        )
    case.manifest, case.spec = manifest, spec


async def check_params(gate: Policy, case: Case) -> None:
    assert case.manifest is not None
    try:
        case.manifest.params_validator(case.action).check(case.params)
    except TuxPilotError as exc:
        raise Stop(Status.refused, Reason.invalid_params, exc.message, exc.to_doc()) from None


async def check_expiry(gate: Policy, case: Case) -> None:
    event = case.event
    if event is not None and event.expired():
        raise Stop(Status.expired, Reason.event_expired, f"event {event.id} is older than its ttl of {event.ttl} s")


async def check_permission(gate: Policy, case: Case) -> None:
    """Refuse an action whose permission the host has not granted.

    An action the manifest marks `dry_run` is not refused: its dry-run verdict is deferred until after
    the cooldown, so that repeated dry runs are paced like real ones.
    """
    manifest, spec = case.manifest, case.spec
    assert manifest is not None and spec is not None
    if spec.permission is None or spec.permission in gate.config.plugin(manifest.name).granted(manifest):
        return
    if spec.dry_run:
        case.deferred = Stop(
            Status.dry_run,
            Reason.permission_not_granted,
            f"dry run: {case.key} executes once the host grants {spec.permission.value}",
        )
        return
    raise Stop(
        Status.refused,
        Reason.permission_not_granted,
        f"{case.key} needs permission {spec.permission.value!r}, which this host has not granted to "
        f"{manifest.name}; run `tuxpilot plugin grant {manifest.name} {spec.permission.value}` to grant it",
    )


async def check_approval(gate: Policy, case: Case) -> None:
    """Hold an action the host's approval policy names until someone allowed answers (it is not claimed
    yet: an approved case goes through every step again, the claim included, so it runs once)."""
    if case.approved_by is not None:
        return
    held = await gate.hold(case)
    if held is not None:
        raise Stop(Status.pending, Reason.approval_required,
                   f"{held}; held for approval {case.id}: `tuxpilot approve {case.id}` or `tuxpilot deny {case.id}`")


async def claim_action(gate: Policy, case: Case) -> None:
    """Claim the action id once and for all: a redelivery, a restart or a second agent never runs it twice."""
    earlier = await gate.claim(case)
    if earlier is not None:
        taken = earlier.get("state")
        raise Stop(Status.duplicate, Reason.already_claimed, f"action {case.id} was taken before ({taken})")


async def check_cooldown(gate: Policy, case: Case) -> None:
    """Cooldowns pace proposals; operator calls only when the host config says so (`gate.operator_cooldowns`)."""
    if case.source is Source.operator and not gate.config.gate.operator_cooldowns:
        return
    assert case.spec is not None
    wait = await gate.cooldown(cooldown_key(case), cooldown_for(gate.config, case.spec, case.key))
    if wait is not None:
        raise Stop(Status.suppressed, Reason.cooldown, f"in cooldown for another {wait:.1f} s")


async def release_deferred(gate: Policy, case: Case) -> None:
    if case.deferred is not None:
        raise case.deferred


async def check_dry_run(gate: Policy, case: Case) -> None:
    if gate.config.gate.dry_run or case.key in gate.config.gate.dry_run_actions:
        raise Stop(Status.dry_run, Reason.dry_run_mode, f"dry run: {case.key} was not executed (gate dry-run policy)")


async def take_fleet_lease(gate: Policy, case: Case) -> None:
    """An action under a fleet concurrency limit runs only holding one of its group's K leases (last: a
    case stopped by any other step never takes one); the gate gives it back once the action is done."""
    refused = await gate.lease(case)
    if refused is not None:
        message, details = refused
        raise Stop(Status.refused, Reason.fleet_limit, message,
                   {"code": Reason.fleet_limit.value, "message": message, "details": details})


STEPS: tuple[Step, ...] = (
    check_proposer,
    check_owner,
    check_params,
    check_expiry,
    check_permission,
    check_approval,
    claim_action,
    check_cooldown,
    release_deferred,
    check_dry_run,
    take_fleet_lease,
)


async def run_steps(steps: tuple[Step, ...] | list[Step], gate: Policy, case: Case) -> None:
    """Every step in order; the first to stop the case raises `Stop`."""
    for step in steps:
        await step(gate, case)
