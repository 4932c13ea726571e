"""The host's rules, schedules and approvals, running in the agent and acting only through the gate.

Rules read the host's events (`P.evt.H.>`) and the last metrics snapshot; a rule that matches and is
not throttled becomes one gate case per action (source `rule`, the rule as proposer). Schedules become
cases with source `schedule`. The gate asks `hold` whether a case waits for approval; the answer to
`P.approve.H.<id>` releases it through every step again, or records the denial. The operator's CLI asks
this part through the agent's control subjects (`P.agent.H.rules|schedules|approvals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import ValidationError

from tuxpilot.agent.approvals import ApprovalStore, Expired, required, timeout_for
from tuxpilot.agent.rules import Proposed, RuleSet, Throttle, Verdict, event_scope
from tuxpilot.agent.schedules import Schedule, Schedules, upcoming_times
from tuxpilot.agent.steps import Case, Stop, action_id
from tuxpilot.bus.streams import SCHEDULES_KEEP_S, SCHEDULES_MAX_BYTES, bounded_bucket
from tuxpilot.lifetime import Part
from tuxpilot.protocol import schemas
from tuxpilot.protocol.approvals import Approval, ApprovalState, Decision
from tuxpilot.protocol.errors import BadRequest, NotFound, TuxPilotError
from tuxpilot.protocol.models import Event, Proposal, ProposedAction, Reason, Result, Source, Status, new_id, now
from tuxpilot.protocol.names import caller_of, gate_queue, proposal_id, schedule_key, schedules_bucket

if TYPE_CHECKING:
    from tuxpilot.agent.config import Config
    from tuxpilot.agent.gate import Gate

log = structlog.get_logger("tuxpilot.automation")

EXPLAINED_KEPT = 200
SWEEP_S = 1.0
# Listing the approvals means a watch (a consumer made and dropped on the server): it is done when an
# approval this agent knows of is due, and at least this often for the ones it does not (another agent
# of the host held them before a restart). Listing every second cost an idle agent ~0.1 % of a core and
# its server ~0.2 %.
FULL_SWEEP_S = 60.0
RULES_FILE_POLL_S = 2.0
MAX_REQUEST = 256 * 1024


class Automation(Part):
    def __init__(self, nc: Client, config: Config, gate: Gate):
        self.nc, self.config, self.gate = nc, config, gate
        self.subjects = gate.subjects
        self.rules = RuleSet()
        self.throttle = Throttle()
        self.metrics: dict[str, Any] = {}
        self.explained: deque[dict[str, Any]] = deque(maxlen=EXPLAINED_KEPT)
        self.store = ApprovalStore(nc, self.subjects, keep_s=config.approvals.keep_s,
                                   replicas=config.streams.replicas, update=config.fleet.enrollment is None)
        self.schedules: Schedules | None = None
        self.schedule_refused: dict[str, str] = {}
        self._last_runs: KeyValue | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._rules_stamp: float | None = None
        self._due: datetime | None = None  # the earliest expiry of the pending approvals known

    # -- lifetime ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        self._last_runs = await bounded_bucket(
            self.nc.jetstream(), schedules_bucket(self.subjects), max_age=SCHEDULES_KEEP_S,
            max_bytes=SCHEDULES_MAX_BYTES, replicas=self.config.streams.replicas,
            what="TuxPilot: when each host's schedules last ran", update=self.config.fleet.enrollment is None,
        )
        self.gate.approvals = self
        self.load_rules()
        await self.start_schedules()
        s, queue = self.subjects, gate_queue(self.subjects.host)
        self._subs = [
            await self.nc.subscribe(s.events("*.*", host=s.host), cb=self._on_event),
            await self.nc.subscribe(s.metrics(), cb=self._on_metrics),
            await self.nc.subscribe(s.approve("*"), queue=queue, cb=self._spawn(self._on_approve)),
            await self.nc.subscribe(s.agent_control("rules"), cb=self._spawn(self._on_rules)),
            await self.nc.subscribe(s.agent_control("schedules"), cb=self._spawn(self._on_schedules)),
            await self.nc.subscribe(s.agent_control("approvals"), cb=self._spawn(self._on_approvals)),
        ]
        self._loops = [asyncio.create_task(self._sweep(), name="approvals-sweep"),
                       asyncio.create_task(self._watch_rules_file(), name="rules-file-watch")]
        log.info("automation.started", rules=sorted(self.rules.rules), refused=sorted(self.rules.refused),
                 schedules=sorted(self.schedules.specs) if self.schedules else [])

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.schedules is not None:
            self.schedules.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.config.gate.action_timeout_s)
        self.gate.approvals = None

    def _spawn(self, handler: Any) -> Any:
        """Handlers of one subscription run one at a time: each request gets its own task."""
        async def cb(msg: Msg) -> None:
            task = asyncio.create_task(handler(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return cb

    def reload(self, fresh: Config) -> None:
        """Rules, schedules and the approval policy from a changed host config, without a restart."""
        self.config.rules, self.config.rules_file = fresh.rules, fresh.rules_file
        self.config.schedules, self.config.approvals = fresh.schedules, fresh.approvals
        self.config.labels = fresh.labels
        self.load_rules()
        task = asyncio.get_running_loop().create_task(self.start_schedules())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def load_rules(self) -> None:
        path = self.config.rules_file
        self._rules_stamp = _mtime(path)
        self.rules = RuleSet.load(self.config.rules, path)
        for name, why in self.rules.refused.items():
            log.error("rule.refused", rule=name, error=why)
        log.info("rules.loaded", rules=sorted(self.rules.rules), refused=sorted(self.rules.refused))

    async def _watch_rules_file(self) -> None:
        while True:
            await asyncio.sleep(RULES_FILE_POLL_S)
            if self.config.rules_file is not None and _mtime(self.config.rules_file) != self._rules_stamp:
                self.load_rules()

    # -- rules ---------------------------------------------------------------------------------------

    async def _on_metrics(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            doc = json.loads(msg.data)
            if isinstance(doc, dict):
                self.metrics = doc

    async def _on_event(self, msg: Msg) -> None:
        try:
            doc = schemas.parse(msg.data, what="event", limit=MAX_REQUEST)
            event = Event.model_validate(doc)
        except (TuxPilotError, ValidationError):
            return  # not an event the gate or a plugin would take either
        if event.host != self.subjects.host or not self.rules.rules:
            return
        verdicts = self.rules.evaluate(event, self.scope(event))
        for verdict in verdicts:
            if not verdict.matched:
                continue
            compiled = self.rules.rules[verdict.rule]
            throttled = self.throttle.admit(compiled.rule)
            if throttled is not None:
                verdict.matched, verdict.why = False, f"throttled: {throttled}"
                continue
            task = asyncio.create_task(self.fire_rule(verdict, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.explained.append({"event": event.to_doc(), "verdicts": [_verdict_doc(v) for v in verdicts]})

    def scope(self, event: Event) -> dict[str, Any]:
        # The fleet's labels of this host, and the host's own (which win): one set of labels for rules.
        return event_scope(event, {**self.config.fleet.labels, **self.config.labels}, self.metrics)

    async def fire_rule(self, verdict: Verdict, event: Event) -> list[Result]:
        log.info("rule.fired", rule=verdict.rule, event_id=event.id, event_type=event.type)
        return [await self.gate.decide(self.rule_case(verdict.rule, a, event)) for a in verdict.actions]

    def rule_case(self, rule: str, action: Proposed, event: Event) -> Case:
        # The rule's stand-in proposal carries the event, so the case is audited with its event id and
        # the event's ttl applies; the action id is the one a plugin proposing the same would get.
        proposal = Proposal(
            id=proposal_id(event.id, f"rule-{rule}"), event_id=event.id, plugin=action.plugin, event=event,
            actions=[ProposedAction(plugin=action.plugin, action=action.action, params=action.params,
                                    reason=action.reason[:1024])],
        )
        return Case(source=Source.rule, plugin=action.plugin, action=action.action, params=action.params,
                    id=action_id(event.id, action.plugin, action.action, action.params), proposer=rule,
                    proposal=proposal, resource=event.resource)

    def test_rule(self, name: str, event: Event) -> dict[str, Any]:
        compiled = self.rules.rules.get(name)
        if compiled is None:
            refused = self.rules.refused.get(name)
            raise NotFound(refused or f"no rule {name!r} (rules: {', '.join(sorted(self.rules.rules)) or 'none'})")
        return _verdict_doc(compiled.evaluate(event, self.scope(event)))

    # -- schedules -----------------------------------------------------------------------------------

    async def start_schedules(self) -> None:
        if self.schedules is not None:
            self.schedules.stop()
        specs, self.schedule_refused = [], {}
        for i, entry in enumerate(self.config.schedules):
            try:
                specs.append(Schedule.model_validate(entry))
            except ValidationError as exc:
                label = str(entry.get("name", f"#{i}")) if isinstance(entry, dict) else f"#{i}"
                err = exc.errors()[0]
                self.schedule_refused[label] = f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                log.error("schedule.refused", schedule=label, error=self.schedule_refused[label])
        last_runs = {s.name: t for s in specs if (t := await self._last_run(s.name)) is not None}
        self.schedules = Schedules(specs, self.fire_schedule, self.missed_schedule, last_runs=last_runs)
        self.schedules.start()

    async def _last_run(self, name: str) -> datetime | None:
        assert self._last_runs is not None
        try:
            entry = await self._last_runs.get(schedule_key(self.subjects.host, name))
            return datetime.fromisoformat((entry.value or b"").decode())
        except (KeyNotFoundError, ValueError):
            return None

    async def _save_run(self, name: str, at: datetime) -> None:
        assert self._last_runs is not None
        with contextlib.suppress(Exception):  # only a restart's misfire accounting depends on it
            await self._last_runs.put(schedule_key(self.subjects.host, name), at.isoformat().encode())

    async def fire_schedule(self, spec: Schedule) -> list[Result]:
        await self._save_run(spec.name, datetime.now(UTC))
        return [await self.gate.decide(self.schedule_case(spec, a.plugin, a.action, a.params)) for a in spec.actions]

    def schedule_case(self, spec: Schedule, plugin: str, action: str, params: dict[str, Any]) -> Case:
        return Case(source=Source.schedule, plugin=plugin, action=action, params=params, id=new_id(),
                    proposer=spec.name)

    async def missed_schedule(self, spec: Schedule, scheduled: datetime) -> None:
        await self._save_run(spec.name, scheduled)
        for a in spec.actions:
            case = self.schedule_case(spec, a.plugin, a.action, a.params)
            result = Result(status=Status.expired, reason=Reason.missed_run,
                            message=f"schedule {spec.name}: the run of {scheduled.isoformat()} was missed (the "
                                    f"agent was not running) and is older than misfire_grace_s "
                                    f"({spec.misfire_grace_s:g} s); the next run is at its next time")
            await self.gate.record(self.gate.stamp(result, case), a.plugin, a.action)

    # -- approvals -----------------------------------------------------------------------------------

    async def hold(self, case: Case) -> str | None:
        """The gate's question: does this case wait for approval? If so it is stored and announced."""
        policy = self.config.approvals
        permission = case.spec.permission.value if case.spec is not None and case.spec.permission else None
        why = required(policy, key=case.key, permission=permission,
                       rule=case.proposer if case.source is Source.rule else None,
                       schedule=case.proposer if case.source is Source.schedule else None)
        if why is None:
            return None
        at = now()
        proposal = case.proposal
        resume: dict[str, Any] = {"source": case.source.value}
        if proposal is not None:
            # Kept without the event: an approval, not the event's ttl, decides how late it may run.
            resume["proposal"] = proposal.model_copy(update={"event": None}).to_doc()
        reason = proposal.actions[0].reason if proposal is not None and proposal.actions else None
        approval = Approval(
            id=case.id, host=self.subjects.host, plugin=case.plugin, action=case.action, params=case.params,
            why=why, reason=reason, proposer=case.proposer, source=case.source.value, caller=case.caller,
            event_id=case.event_id, resource=case.resource, requested_at=at,
            expires_at=at + timedelta(seconds=timeout_for(policy, case.proposer if case.source in (
                Source.rule, Source.schedule) else None, case.key)), resume=resume,
        )
        if await self.store.open(approval):
            self._due = _earliest(self._due, approval.expires_at)
            await self.nc.publish(self.subjects.approval(approval.id), approval.to_json())
            return why
        # The same action held before (a redelivery, or a plugin proposing what a rule did for one event).
        earlier, _ = await self.store.get(approval.id)
        if earlier.state is ApprovalState.denied:
            raise Stop(Status.refused, Reason.approval_denied, f"denied by {earlier.decided_by} before")
        if earlier.state is ApprovalState.expired:
            raise Stop(Status.expired, Reason.approval_expired, "its approval expired before")
        # pending: held still; approved: the claim step says it ran (or runs) once already
        return why if earlier.state is ApprovalState.pending else None

    async def _on_approve(self, msg: Msg) -> None:
        approval_id = msg.subject.rsplit(".", 1)[-1]
        by = caller_of(msg.reply)
        try:
            decision = Decision.model_validate(schemas.parse(msg.data, what="decision", limit=MAX_REQUEST))
        except ValidationError as exc:
            await _respond(msg, error=BadRequest(f"decision: {exc.errors()[0]['msg']}"))
            return
        except TuxPilotError as exc:
            await _respond(msg, error=exc)
            return
        try:
            result = await self.answer(approval_id, decision, by)
        except TuxPilotError as exc:
            await _respond(msg, error=exc)
            return
        await _respond(msg, body=result.to_json())

    async def answer(self, approval_id: str, decision: Decision, by: str | None) -> Result:
        """Approve (the case goes through the gate again and runs once) or deny; both audited."""
        if not by:
            raise BadRequest("an answer must be a request with a reply inbox: it names the approver")
        try:
            approval = await self.store.decide(approval_id, decision, by, approvers=self.config.approvals.approvers)
        except Expired:
            await self._record_expired((await self.store.get(approval_id))[0])
            raise
        case = self._resumed(approval)
        case.approved_by = by
        if approval.state is ApprovalState.approved:
            return await self.gate.decide(case)
        comment = f": {approval.comment}" if approval.comment else ""
        result = Result(status=Status.refused, reason=Reason.approval_denied,
                        message=f"denied by {by}{comment}")
        result = self.gate.stamp(result, case)
        await self.gate.record(result, case.plugin, case.action)
        return result

    def _resumed(self, approval: Approval) -> Case:
        source = Source(approval.resume.get("source", approval.source))
        proposal_doc = approval.resume.get("proposal")
        proposal = Proposal.model_validate(proposal_doc) if proposal_doc else None
        return Case(source=source, plugin=approval.plugin, action=approval.action, params=approval.params,
                    id=approval.id, proposer=approval.proposer, caller=approval.caller, proposal=proposal,
                    resource=approval.resource)

    async def _record_expired(self, approval: Approval) -> None:
        case = self._resumed(approval)
        result = Result(status=Status.expired, reason=Reason.approval_expired,
                        message=f"no answer before {approval.expires_at.isoformat()}")
        await self.gate.record(self.gate.stamp(result, case), case.plugin, case.action)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        listed = -FULL_SWEEP_S
        while True:
            await asyncio.sleep(SWEEP_S)
            due = self._due
            if (due is None or now() < due) and loop.time() - listed < FULL_SWEEP_S:
                continue
            try:
                for approval in await self.store.sweep():
                    log.info("approval.expired", approval_id=approval.id)
                    await self._record_expired(approval)
                listed = loop.time()
                # An approval held while the sweep listed may be missing from its listing: kept.
                found = self.store.next_expiry
                self._due = found if self._due == due else _earliest(found, self._due)
            except Exception as exc:  # the server is away: the next sweep does it
                log.warning("approvals.sweep_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    # -- the operator's control requests -------------------------------------------------------------

    async def _on_rules(self, msg: Msg) -> None:
        try:
            req = _request(msg)
            op = req.get("op", "list")
            if op == "list":
                body: Any = {
                    "rules": [{**c.rule.model_dump(mode="json")} for c in self.rules.rules.values()],
                    "refused": self.rules.refused,
                }
            elif op == "test":
                event = Event.model_validate({"id": new_id(), "host": self.subjects.host, "time": now().isoformat(),
                                              "severity": "warning", **req.get("event", {})})
                body = self.test_rule(str(req.get("rule", "")), event)
            elif op == "explain":
                last = int(req.get("last", 10))
                body = {"events": list(self.explained)[-last:] if last > 0 else []}
            else:
                raise BadRequest(f"unknown op {op!r}")
        except ValidationError as exc:
            await _respond(msg, error=BadRequest(f"event: {exc.errors()[0]['msg']}"))
            return
        except TuxPilotError as exc:
            await _respond(msg, error=exc)
            return
        await _respond(msg, body=json.dumps(body, default=str).encode())

    async def _on_schedules(self, msg: Msg) -> None:
        try:
            req = _request(msg)
            if req.get("op", "list") == "run":
                name = str(req.get("name", ""))
                if self.schedules is None or name not in self.schedules.specs:
                    raise NotFound(f"no schedule {name!r}")
                results = await self.schedules.run(name)
                body: Any = {"results": [r.to_doc() for r in results]}
            else:
                upcoming = self.schedules.upcoming() if self.schedules else []
                body = {
                    "schedules": [{**u.spec.model_dump(mode="json"), "next_runs": _next_runs(u.spec, u.next_run)}
                                  for u in upcoming],
                    "refused": self.schedule_refused,
                }
        except TuxPilotError as exc:
            await _respond(msg, error=exc)
            return
        await _respond(msg, body=json.dumps(body, default=str).encode())

    async def _on_approvals(self, msg: Msg) -> None:
        try:
            req = _request(msg)
            items = await self.store.listing() if req.get("all") else await self.store.pending()
            body = {"approvals": [a.to_doc() for a in items]}
        except TuxPilotError as exc:
            await _respond(msg, error=exc)
            return
        await _respond(msg, body=json.dumps(body).encode())


def _next_runs(spec: Schedule, first: datetime | None, count: int = 3) -> list[str]:
    """The next run APScheduler holds, and the ones after it, in the schedule's time zone."""
    if first is None:
        return []
    return [t.isoformat() for t in [first, *upcoming_times(spec, first, count - 1)]]


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime if path is not None else None
    except OSError:
        return None


def _verdict_doc(v: Verdict) -> dict[str, Any]:
    return {"rule": v.rule, "matched": v.matched, "why": v.why,
            "actions": [{"plugin": a.plugin, "action": a.action, "params": a.params} for a in v.actions]}


def _request(msg: Msg) -> dict[str, Any]:
    doc = schemas.parse(msg.data or b"{}", what="request", limit=MAX_REQUEST)
    if not isinstance(doc, dict):
        raise BadRequest("the request must be a JSON object")
    return doc


async def _respond(msg: Msg, body: bytes | None = None, error: TuxPilotError | None = None) -> None:
    """Reply to the caller's inbox, with only our headers; errors as an `error` document with the micro
    error headers (never an empty body: `nats req --replies` would end on it)."""
    if not msg.reply:
        return
    headers = None
    if error is not None:
        body = json.dumps(error.to_doc()).encode()
        headers = {ERROR_HEADER: error.message[:1000].replace("\n", " "), ERROR_CODE_HEADER: str(error.status)}
    try:
        await msg._client.publish(msg.reply, body or b"{}", headers=headers)
    except Exception as exc:  # the caller went away: nothing to tell it
        log.warning("automation.reply_failed", subject=msg.subject, error=f"{type(exc).__name__}: {exc}"[:200])


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)
