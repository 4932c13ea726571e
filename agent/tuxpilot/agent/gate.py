"""The gate: every proposed action goes parse → validate → authorise → policy → execute → record.

Each step is a small function that either passes or raises `Stop` saying why; `Gate` strings them
together, executes what survives by request to the owning plugin, and publishes every outcome on
`tuxpilot.result.<host>.<plugin>.<action>`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from tuxpilot.agent.config import Config
from tuxpilot.agent.ledger import Ledger
from tuxpilot.agent.registry import Registry
from tuxpilot.bus.consumer import Durable
from tuxpilot.bus.streams import ensure_streams
from tuxpilot.lifetime import Part
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import BadRequest, TuxPilotError, error_doc
from tuxpilot.protocol.manifest import ActionSpec, Manifest
from tuxpilot.protocol.models import ErrorDoc, Proposal, ProposedAction, Result, Status, now
from tuxpilot.protocol.names import ACTION_ID_HEADER, EVENT_ID_HEADER, Names, Subjects

log = structlog.get_logger("tuxpilot.gate")

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
# Results about proposals too broken to name a plugin and action are filed under this pair.
GATE_PLUGIN, GATE_ACTION = "gate", "proposal"
BACKPRESSURE_DELAY_S = 0.5
RECORD_ATTEMPTS = 10
RESEND_ATTEMPTS = 3
UNAVAILABLE_RETRY_S = 0.1
LINK_POLL_S = 0.2
COOLDOWNS_CACHED = 100_000


class Stop(Exception):
    """A step's verdict that this action goes no further, and why."""

    def __init__(self, status: Status, reason: str, message: str, error: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.error = error


# -- steps ---------------------------------------------------------------------------------------


def parse_proposal(raw: bytes, max_payload: int) -> Proposal:
    """Bytes to a schema-valid Proposal, or a TuxPilotError naming what is wrong."""
    doc = schemas.parse(raw, what="proposal", limit=max_payload)
    schemas.validator("proposal").check(doc)
    try:
        return Proposal.model_validate(doc)
    except ValidationError as exc:
        raise BadRequest(f"proposal: {exc.errors()[0]['msg']}") from None


def action_id(event_id: str, plugin: str, action: str, params: dict[str, Any]) -> str:
    """Deterministic: the same event asking the same action with the same params is the same action."""
    key = json.dumps([event_id, plugin, action, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def check_owner(proposal: Proposal, action: ProposedAction, manifest: Manifest | None) -> ActionSpec:
    if action.plugin != proposal.plugin:
        raise Stop(
            "refused",
            "foreign_action",
            f"plugin {proposal.plugin!r} may only propose its own actions, not {action.plugin}.{action.action}",
        )
    if manifest is None:
        raise Stop("refused", "unknown_plugin", f"no plugin {action.plugin!r} is registered on this host")
    spec = manifest.actions.get(action.action)
    if spec is None:
        known = ", ".join(sorted(manifest.actions)) or "none"
        raise Stop("refused", "unknown_action", f"{action.plugin} has no action {action.action!r} (it has: {known})")
    return spec


def check_params(manifest: Manifest, action: ProposedAction) -> None:
    try:
        manifest.params_validator(action.action).check(action.params)
    except TuxPilotError as exc:
        raise Stop("refused", "invalid_params", exc.message, exc.to_doc()) from None


def check_expiry(proposal: Proposal) -> None:
    event = proposal.event
    if event is not None and event.expired():
        raise Stop("expired", "event_expired", f"event {event.id} is older than its ttl of {event.ttl} s")


def check_permission(config: Config, manifest: Manifest, spec: ActionSpec, action: ProposedAction) -> Stop | None:
    """Refuse an action whose permission the host has not granted.

    An action the manifest marks `dry_run` is not refused but returns the dry-run verdict, raised
    after the cooldown so that repeated dry runs are paced like real ones.
    """
    if spec.permission is None or spec.permission in config.plugin(manifest.name).granted(manifest):
        return None
    if spec.dry_run:
        return Stop(
            "dry_run",
            "permission_not_granted",
            f"dry run: {action.plugin}.{action.action} executes once the host grants {spec.permission.value}",
        )
    raise Stop(
        "refused",
        "permission_not_granted",
        f"{action.plugin}.{action.action} needs permission {spec.permission.value!r}, which this host has not "
        f"granted to {manifest.name}; run `tuxpilot plugin grant {manifest.name} {spec.permission.value}` to grant it",
    )


def check_dry_run(config: Config, action: ProposedAction) -> None:
    key = f"{action.plugin}.{action.action}"
    if config.gate.dry_run or key in config.gate.dry_run_actions:
        raise Stop("dry_run", "dry_run_mode", f"dry run: {key} was not executed (gate dry-run policy)")


def cooldown_for(config: Config, spec: ActionSpec, action: ProposedAction) -> float:
    configured = config.gate.cooldowns.get(f"{action.plugin}.{action.action}")
    if configured is not None:
        return configured
    return spec.cooldown_s if spec.cooldown_s is not None else config.gate.cooldown_s


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


def cooldown_key(action: ProposedAction, proposal: Proposal) -> str:
    resource = action.resource or (proposal.event.resource if proposal.event else None) or ""
    return f"{action.plugin}.{action.action}:{resource}"


def reply_to_result(msg: Msg) -> Result:
    """A plugin's reply: an `error` document (micro error headers set) or a `result` document."""
    try:
        doc = json.loads(msg.data) if msg.data else None
    except ValueError:
        doc = None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        try:
            error = ErrorDoc.model_validate(doc)
        except ValidationError:
            error = ErrorDoc(code="internal", message=headers.get("Nats-Service-Error", "plugin failed")[:4096])
        return Result(status="error", reason=error.code, message=error.message, error=error)
    if not isinstance(doc, dict) or not schemas.validator("result").is_valid(doc):
        return Result(status="error", reason="bad_reply", message="the plugin's reply is not a result document")
    return Result.model_validate(doc)


def _wake(woken: asyncio.Future[None], *_: object) -> None:
    if not woken.done():
        woken.set_result(None)


# -- the gate ------------------------------------------------------------------------------------


class Gate(Part):
    """Subscribes to the host's proposals and takes each proposed action through the steps."""

    def __init__(self, nc: Client, config: Config, registry: Registry):
        self.nc = nc
        self.config = config
        self.subjects = Subjects.of(config)
        self.registry = registry
        self.cooldowns = Cooldowns()
        self.ledger = Ledger(nc, self.subjects, config.streams)
        self.consumer: Durable | None = None
        self.in_flight: dict[str, int] = {}
        # The requests waiting for a reply, each by the future that `_watch_link` wakes on a reconnect.
        self._waiting: set[asyncio.Future[None]] = set()
        self._link_task: asyncio.Task[None] | None = None
        self.deferred = 0

    async def start(self) -> None:
        """Bind the host's durable proposals consumer; cooldowns come back from KV."""
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.config.streams, update=False)
        await self.ledger.start()
        self.consumer = Durable(
            js,
            stream=Names.of(self.subjects).proposals,
            name=f"gate-{self.subjects.host}",
            filter_subjects=[self.subjects.proposal()],
            handler=self._on_msg,
            # A proposal is acked once decided; redelivery after an agent crash meets the ledger.
            ack_wait=self.config.gate.action_timeout_s * 3,
            # Unlimited: a proposal is only redelivered for back-pressure or after an agent crash.
            max_deliver=-1,
            max_in_flight=self.config.gate.max_concurrency,
            metadata={"tuxpilot": "gate", "host": self.subjects.host},
        )
        await self.consumer.start()
        self._link_task = asyncio.create_task(self._watch_link(), name="gate-link")
        log.info("gate.started", subject=self.subjects.proposal(), dry_run=self.config.gate.dry_run)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop(grace_s=self.config.gate.action_timeout_s)
        if self._link_task is not None:
            self._link_task.cancel()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            proposal = parse_proposal(msg.data, self.config.gate.max_payload)
        except TuxPilotError as exc:
            await self.refuse(exc)
            await msg.ack()
            return
        if self.busy(proposal.plugin):
            # Back-pressure: a plugin that falls behind waits in the stream, not in our slots,
            # so it cannot starve the other plugins' proposals.
            self.deferred += 1
            if self.deferred % 100 == 1:
                log.warning("gate.backpressure", plugin=proposal.plugin, in_flight=self.in_flight[proposal.plugin],
                            deferred=self.deferred)
            await msg.nak(delay=BACKPRESSURE_DELAY_S)
            return
        try:
            await self.handle_proposal(proposal)
        except Exception as exc:  # never redeliver forever: say so on the record, and move on
            log.exception("gate.failed", proposal_id=proposal.id, plugin=proposal.plugin)
            await self.refuse(TuxPilotError(f"the gate failed on this proposal: {error_doc(exc)['message']}"))
        await msg.ack()

    def busy(self, plugin: str) -> bool:
        return self.in_flight.get(plugin, 0) >= self.config.gate.max_in_flight_per_plugin

    async def handle(self, raw: bytes) -> list[Result]:
        """Take one raw proposal through the gate; returns the recorded results."""
        try:
            proposal = parse_proposal(raw, self.config.gate.max_payload)
        except TuxPilotError as exc:
            return [await self.refuse(exc)]
        return await self.handle_proposal(proposal)

    async def refuse(self, exc: TuxPilotError) -> Result:
        """The record of a proposal too broken to name its plugin and action."""
        result = Result(
            status="refused", reason=exc.code, message=exc.message, error=ErrorDoc.model_validate(exc.to_doc()),
            host=self.subjects.host, time=now(),
        )
        await self.record(result, GATE_PLUGIN, GATE_ACTION)
        return result

    async def handle_proposal(self, proposal: Proposal) -> list[Result]:
        self.in_flight[proposal.plugin] = self.in_flight.get(proposal.plugin, 0) + 1
        try:
            return [await self.decide(proposal, action) for action in proposal.actions]
        finally:
            self.in_flight[proposal.plugin] -= 1

    async def decide(self, proposal: Proposal, action: ProposedAction) -> Result:
        started = time.perf_counter()
        aid = action_id(proposal.event_id, action.plugin, action.action, action.params)
        blog = log.bind(event_id=proposal.event_id, action_id=aid, plugin=action.plugin, action=action.action)
        try:
            manifest = await self.registry.get(action.plugin) if action.plugin == proposal.plugin else None
            spec = check_owner(proposal, action, manifest)
            assert manifest is not None
            check_params(manifest, action)
            check_expiry(proposal)
            dry_run = check_permission(self.config, manifest, spec, action)
            earlier = await self.ledger.claim(aid)
            if earlier is not None:
                raise Stop("duplicate", "already_claimed", f"action {aid} was taken before ({earlier.get('state')})")
            await self.claim_cooldown(cooldown_key(action, proposal), cooldown_for(self.config, spec, action))
            if dry_run is not None:
                raise dry_run
            check_dry_run(self.config, action)
            result = await self.execute(action, aid, proposal.event_id, spec)
            await self.ledger.finish(aid, result)
        except Stop as stop:
            error = ErrorDoc.model_validate(stop.error) if stop.error else None
            result = Result(status=stop.status, reason=stop.reason, message=stop.message, error=error)
        result = result.model_copy(
            update={
                "id": aid,
                "host": self.subjects.host,
                "plugin": action.plugin,
                "action": action.action,
                "params": action.params,
                "event_id": proposal.event_id,
                "proposal_id": proposal.id,
                "proposed_by": proposal.plugin,
                "time": now(),
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )
        blog.info("gate.decided", status=result.status, reason=result.reason, ms=result.duration_ms)
        await self.record(result, action.plugin, action.action)
        return result

    async def claim_cooldown(self, key: str, pause: float) -> None:
        if pause <= 0:
            return
        if key not in self.cooldowns.last:  # memory is a cache of the bucket: asked per key, never listed
            since = await self.ledger.cooldown_since(key)
            if since is not None:
                self.cooldowns.last.setdefault(key, since)
        at = time.time()  # wall clock: the time is kept across restarts
        wait = self.cooldowns.claim(key, at, pause)
        if wait is not None:
            raise Stop("suppressed", "cooldown", f"in cooldown for another {wait:.1f} s")
        if len(self.cooldowns.last) > COOLDOWNS_CACHED:  # forgetting one only costs a lookup
            del self.cooldowns.last[next(iter(self.cooldowns.last))]
        await self.ledger.save_cooldown(key, at, pause)

    async def execute(self, action: ProposedAction, aid: str, event_id: str, spec: ActionSpec) -> Result:
        """Request the owning plugin's endpoint; map silence and refusals to results.

        When the link to the server is restored while waiting, the request (or its reply) may have
        been lost with the old connection: it is sent again with the same action id, which the
        plugin answers from its first run instead of running the action twice.
        """
        timeout = spec.timeout_s or self.config.gate.action_timeout_s
        subject, body = self.subjects.act(action.plugin, action.action), json.dumps(action.params).encode()
        headers = {ACTION_ID_HEADER: aid, EVENT_ID_HEADER: event_id}
        # No responders means the request reached nobody: safe to ask again while a plugin
        # (re)subscribes, for example just after the server came back.
        patience = asyncio.get_running_loop().time() + self.config.gate.unavailable_retry_s
        while True:
            try:
                return reply_to_result(await self._request(subject, body, timeout, headers))
            except NoRespondersError:
                if asyncio.get_running_loop().time() < patience:
                    await asyncio.sleep(UNAVAILABLE_RETRY_S)
                    continue
                message = f"no {action.plugin} instance is serving {action.action}"
                return Result(status="unavailable", reason="no_responders", message=message)
            except (NatsTimeout, TimeoutError):
                return Result(status="timeout", reason="timeout", message=f"no reply within {timeout} s")
            except Exception as exc:
                return Result(status="error", reason="internal", message=error_doc(exc)["message"])

    async def _request(self, subject: str, body: bytes, wait_s: float, headers: dict[str, str]) -> Msg:
        """One request, sent again (same headers) if the link is restored while it waits."""
        loop = asyncio.get_running_loop()
        for attempt in range(RESEND_ATTEMPTS):
            # One future, woken by the reply (or its failure) or by `_watch_link` on a reconnect: a task
            # waiting on an Event and `asyncio.wait` for each request cost ~13 µs of CPU per action.
            woken: asyncio.Future[None] = loop.create_future()
            request = asyncio.ensure_future(self.nc.request(subject, body, timeout=wait_s, headers=headers))
            request.add_done_callback(functools.partial(_wake, woken))
            self._waiting.add(woken)
            try:
                await woken
            finally:
                self._waiting.discard(woken)
            if request.done():
                return request.result()
            request.cancel()
            log.info("gate.request_resent", action_id=headers.get(ACTION_ID_HEADER), subject=subject, attempt=attempt)
        return await self.nc.request(subject, body, timeout=wait_s, headers=headers)

    async def _watch_link(self) -> None:
        """Wake the requests waiting when the client has reconnected."""
        seen = self.nc.stats["reconnects"]
        while True:
            await asyncio.sleep(LINK_POLL_S)
            now_seen = self.nc.stats["reconnects"]
            if now_seen != seen and self.nc.is_connected:
                seen = now_seen
                for woken in list(self._waiting):
                    _wake(woken)

    async def record(self, result: Result, plugin: str, action: str) -> None:
        """Store the outcome in the audit stream; retried through a reconnect, deduplicated by id."""
        subject = self.subjects.result(plugin, action)
        try:
            body = result.to_json()
        except ValueError as exc:  # data a plugin returned that JSON cannot carry
            log.error("gate.unrecordable", plugin=plugin, action=action, action_id=result.id, error=str(exc)[:200])
            result = Result(
                id=result.id, status="error", reason="unrecordable", host=result.host, plugin=result.plugin,
                action=result.action, event_id=result.event_id, proposal_id=result.proposal_id, time=result.time,
                message=f"the outcome ({result.status}) could not be recorded as JSON: {str(exc)[:200]}",
            )
            body = result.to_json()
        headers = {"Nats-Msg-Id": f"{result.id}-{result.status}"} if result.id else None
        for attempt in range(RECORD_ATTEMPTS):
            try:
                await self.nc.jetstream().publish(subject, body, headers=headers, timeout=2.0)
                return
            except Exception as exc:
                log.warning("gate.record_retry", plugin=plugin, action=action, attempt=attempt, error=str(exc)[:200])
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        log.error("gate.record_failed", plugin=plugin, action=action, action_id=result.id)
