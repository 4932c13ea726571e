"""The gate: every action, proposed by a plugin or called by an operator, goes through the same steps.

Proposals come from the host's proposals stream, each plugin on its own subject
(`tuxpilot.proposal.<host>.<plugin>`, the only one nats-server lets it publish on), so the proposer is
read from the subject, never from the body. Operators, rules and schedules call the public endpoint
`tuxpilot.act.<host>.<plugin>.<action>`, which the gate serves as the NATS micro service
`tuxpilot-gate`. Both become a `Case` that passes the ordered steps (`tuxpilot.agent.steps`), is
executed by request to the owning plugin's private endpoint `tuxpilot.exec.<host>.<plugin>.<action>`
(which only the agent's user may publish to), and is recorded on `tuxpilot.result.<host>.<plugin>.<action>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Protocol

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service
from pydantic import ValidationError

from tuxpilot.agent import handoff
from tuxpilot.agent.config import Config
from tuxpilot.agent.executor import Executor
from tuxpilot.agent.leases import LeaseRefused, Leases
from tuxpilot.agent.ledger import Ledger
from tuxpilot.agent.rates import ProposalRates, Window
from tuxpilot.agent.registry import Registry
from tuxpilot.agent.steps import (
    STEPS,
    Case,
    Cooldowns,
    Step,
    Stop,
    action_id,
    params_digest,
    run_steps,
)
from tuxpilot.bus.consumer import Durable
from tuxpilot.bus.streams import ensure_streams
from tuxpilot.lifetime import Part, cancel
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import STATUS_CODES, BadRequest, TuxPilotError, error_doc
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.models import ErrorDoc, GateLoad, Proposal, Reason, Result, Source, Status, new_id, now
from tuxpilot.protocol.names import (
    ACTION_ID_HEADER,
    EVENT_ID_HEADER,
    GATE_SERVICE,
    MSG_ID_HEADER,
    Names,
    Subjects,
    caller_of,
    gate_queue,
)
from tuxpilot.protocol.registry import GATE_KIND, KIND_KEY

__all__ = ["Cooldowns", "Gate", "Stop", "action_id", "parse_proposal", "reply_to_result"]

log = structlog.get_logger("tuxpilot.gate")

# Results about proposals too broken to name a plugin and action are filed under this pair.
GATE_PLUGIN, GATE_ACTION = "gate", "proposal"
# Records about a plugin's proposals as a whole (the rate limit's summaries): `<plugin>.proposal`.
PROPOSALS_ACTION = "proposal"
BACKPRESSURE_DELAY_S = 0.5
# A proposal the bus could not decide for now (no stream leader, no ack in time, reconnecting) comes back.
RETRY_DELAY_S = 1.0
BUS_UNAVAILABLE: tuple[type[Exception], ...] = (
    NoStreamResponseError, ServiceUnavailableError, NoRespondersError, NatsTimeout,
    ConnectionClosedError, ConnectionReconnectingError,
)
RECORD_ATTEMPTS = 10
UNAVAILABLE_RETRY_S = 0.1
RATE_SUMMARY_POLL_S = 1.0
# Largest body an operator call may carry: the same bound the SDK puts on params.
MAX_CALL_BYTES = 256 * 1024
LATE_RECORD_WAIT_S = 10.0
COOLDOWNS_CACHED = 100_000


class Holder(Protocol):
    """What holds an action for approval: returns why it is held, or None to let it pass."""

    async def hold(self, case: Case) -> str | None: ...


def parse_proposal(raw: bytes, max_payload: int) -> Proposal:
    """Bytes to a schema-valid Proposal, or a TuxPilotError naming what is wrong."""
    doc = schemas.parse(raw, what="proposal", limit=max_payload)
    schemas.validator("proposal").check(doc)
    try:
        return Proposal.model_validate(doc)
    except ValidationError as exc:
        raise BadRequest(f"proposal: {exc.errors()[0]['msg']}") from None


def reply_to_result(msg: Msg) -> Result:
    """A plugin's reply: an `error` document (micro error headers set) or a `result` document.

    Only what a plugin may say about its own outcome is taken from it (status, reason, message, data,
    artifacts, error); who asked, for what and when is the gate's to record.
    """
    try:
        doc = json.loads(msg.data) if msg.data else None
    except ValueError:
        doc = None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        try:
            error = ErrorDoc.model_validate(doc)
        except ValidationError:
            error = ErrorDoc(code="internal", message=headers.get(ERROR_HEADER, "plugin failed")[:4096])
        return Result(status=Status.error, reason=error.code, message=error.message, error=error)
    if not isinstance(doc, dict) or not schemas.validator("result").is_valid(doc):
        return Result(status=Status.error, reason=Reason.bad_reply,
                      message="the plugin's reply is not a result document")
    full = Result.model_validate(doc)
    return Result(
        status=full.status, reason=full.reason, message=full.message, data=full.data, artifacts=full.artifacts,
        error=full.error,
    )


def _service_version() -> str:
    try:
        return package_version("tuxpilot")
    except PackageNotFoundError:
        return "0.0.0"


class Gate(Part):
    """Decides the host's proposals and serves the host's public action endpoints."""

    def __init__(self, nc: Client, config: Config, registry: Registry, steps: Sequence[Step] = STEPS):
        self.nc = nc
        self.config = config
        self.subjects = Subjects.of(config)
        self.registry = registry
        self.steps = list(steps)
        self.cooldowns = Cooldowns()
        self.ledger = Ledger(nc, self.subjects, config.streams, update=config.fleet.enrollment is None)
        self.executor: Executor[Case] = Executor(nc, self._on_late, watch_s=config.gate.late_reply_window_s)
        self.rates = ProposalRates()
        self.leases = Leases(nc, self.subjects, {**config.fleet.labels, **config.labels},
                             create=config.fleet.enrollment is None)
        self.consumer: Durable | None = None
        self.service: Service | None = None
        self.in_flight: dict[str, int] = {}
        self.deferred = 0
        self._calls: set[asyncio.Task[None]] = set()
        self._served: set[tuple[str, str]] = set()
        self._call_slots = asyncio.Semaphore(config.gate.max_concurrency)
        self._rates_task: asyncio.Task[None] | None = None
        # The host's approvals (set by the agent); without them no action is held.
        self.approvals: Holder | None = None
        # Timed-out cases whose timeout record is not yet stored: a late reply waits for it.
        self._recording: dict[str, asyncio.Event] = {}
        # Proposals handed over by request (`handoff`): being decided, and decided lately.
        self.settled = handoff.Settled()
        self._handoffs: Any = None

    # -- what the steps ask (steps.Policy) ---------------------------------------------------------

    def manifest(self, plugin: str) -> Manifest | None:
        return self.registry.get(plugin)

    async def claim(self, case: Case) -> dict[str, Any] | None:
        return await self.ledger.claim(case.id)

    async def cooldown(self, key: str, pause: float) -> float | None:
        if pause <= 0:
            return None
        if key not in self.cooldowns.last:  # memory is a cache of the bucket: asked per key, never listed
            since = await self.ledger.cooldown_since(key)
            if since is not None:
                self.cooldowns.last.setdefault(key, since)
        at = time.time()  # wall clock: the time is kept across restarts
        wait = self.cooldowns.claim(key, at, pause)
        if wait is None:
            if len(self.cooldowns.last) > COOLDOWNS_CACHED:  # forgetting one only costs a lookup
                del self.cooldowns.last[next(iter(self.cooldowns.last))]
            await self.ledger.save_cooldown(key, at, pause)
        return wait

    async def hold(self, case: Case) -> str | None:
        return await self.approvals.hold(case) if self.approvals is not None else None

    async def lease(self, case: Case) -> tuple[str, dict[str, Any]] | None:
        assert case.spec is not None
        limit = self.config.gate.fleet_limits.get(case.key) or case.spec.fleet_limit
        if limit is None:
            return None
        try:
            case.lease = await self.leases.acquire(case.plugin, case.action, limit,
                                                   case.spec.timeout_s or self.config.gate.action_timeout_s, case.id)
        except LeaseRefused as refused:
            return refused.message, refused.details
        return None

    # -- lifetime ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the host's durable proposals consumer and serve the public action endpoints."""
        js = self.nc.jetstream()
        await ensure_streams(js, self.subjects, self.config.streams, update=False)
        await self.ledger.start()  # before the records: they are stored through its publisher
        await self.executor.start()
        self.consumer = Durable(
            js,
            stream=Names.of(self.subjects).proposals,
            name=f"gate-{self.subjects.host}",
            filter_subjects=[self.subjects.proposals()],
            handler=self._on_msg,
            # A proposal is acked once decided; redelivery after an agent crash meets the ledger.
            ack_wait=self.config.gate.action_timeout_s * 3,
            # Unlimited: a proposal is only redelivered for back-pressure or after an agent crash.
            max_deliver=-1,
            max_in_flight=self.config.gate.max_concurrency,
            metadata={KIND_KEY: GATE_KIND, "host": self.subjects.host},
        )
        await self.consumer.start()
        self._handoffs = await self.nc.subscribe(self.subjects.handoffs(), queue=gate_queue(self.subjects.host),
                                                 cb=self._on_handoff)
        await self._serve()
        self._rates_task = asyncio.create_task(self._summarise_rates(), name="gate-rates")
        log.info("gate.started", proposals=self.subjects.proposals(), endpoints=self.subjects.act("*", "*"),
                 dry_run=self.config.gate.dry_run)

    async def load(self) -> GateLoad:
        """Proposals stored and not yet decided (its consumer's backlog and unacked), actions running now."""
        assert self.consumer is not None
        info = await self.nc.jetstream().consumer_info(self.consumer.stream, self.consumer.name)
        return GateLoad(pending=info.num_pending + info.num_ack_pending, in_flight=sum(self.in_flight.values()))

    async def stop(self) -> None:
        if self._handoffs is not None:  # a plugin that gets no answer now stores its proposal
            with contextlib.suppress(Exception):
                await self._handoffs.unsubscribe()
        if self.service is not None:
            with contextlib.suppress(Exception):
                await self.service.stop()
        if self.consumer is not None:
            await self.consumer.stop(grace_s=self.config.gate.action_timeout_s)
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=self.config.gate.action_timeout_s)
        if self._rates_task is not None:
            await cancel(self._rates_task)
        for window in self.rates.flush():
            await self._record_rate_summary(window)
        await self.executor.stop()
        await self.ledger.stop()

    # -- proposals -----------------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        proposer = self.subjects.proposer(msg.subject) or GATE_PLUGIN
        limit = self.config.gate.proposal_rates.get(proposer, self.config.gate.proposal_rate)
        proposal_ref = (msg.headers or {}).get(MSG_ID_HEADER) or str(msg.metadata.sequence.stream)
        window_s = self.config.gate.proposal_rate_window_s
        # Counted once, at its first delivery: a proposal back-pressure made wait is not a new one.
        first = msg.metadata.num_delivered <= 1
        # The rate is the plugin's publishing rate: measured at the time the server stored each proposal,
        # not when the gate gets to it (a gate that falls behind would otherwise never see a flood).
        stored = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
        if first and not self.rates.admit(proposer, proposal_ref, stored, limit, window_s):
            # Over the plugin's rate: not decided, not recorded one by one (the window's summary says it).
            await msg.ack()
            return
        try:
            proposal = parse_proposal(msg.data, self.config.gate.max_payload)
        except TuxPilotError as exc:
            await self.refuse(exc, proposer)
            await msg.ack()
            return
        if await self.settled.settled(proposer, proposal.id):  # handed over by request too, and decided there
            await msg.ack()
            return
        if self.busy(proposer):
            # Back-pressure: a plugin that falls behind waits in the stream, not in our slots,
            # so it cannot starve the other plugins' proposals.
            self.deferred += 1
            if self.deferred % 100 == 1:
                log.warning("gate.backpressure", plugin=proposer, in_flight=self.in_flight[proposer],
                            deferred=self.deferred)
            await msg.nak(delay=BACKPRESSURE_DELAY_S)
            return
        try:
            await self.handle_proposal(proposal, proposer)
        except BUS_UNAVAILABLE as exc:
            # The bus could not store the claim or the record right now (a replicated stream electing a
            # new leader after a server died, a reconnect): nothing was decided for good, so the proposal
            # waits in its stream and comes back, where the claim keeps an action from running twice.
            log.warning("gate.retry_later", proposal_id=proposal.id, plugin=proposer,
                        error=f"{type(exc).__name__}: {exc}", delivered=msg.metadata.num_delivered)
            with contextlib.suppress(Exception):
                await msg.nak(delay=RETRY_DELAY_S)
            return
        except Exception as exc:  # never redeliver forever: say so on the record, and move on
            log.exception("gate.failed", proposal_id=proposal.id, plugin=proposer)
            await self.refuse(TuxPilotError(f"the gate failed on this proposal: {error_doc(exc)['message']}"), proposer)
        await msg.ack()

    def busy(self, plugin: str) -> bool:
        return self.in_flight.get(plugin, 0) >= self.config.gate.max_in_flight_per_plugin

    # -- proposals handed over by request (`handoff`) ----------------------------------------------

    async def _on_handoff(self, msg: Msg) -> None:
        task = asyncio.create_task(self._hand_off(msg))  # one at a time per subscription otherwise
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _hand_off(self, msg: Msg) -> None:
        """Decide a proposal a plugin hands over and answer once its records are stored; or answer `retry`
        (busy, or the bus cannot store the decision now) and the plugin stores it instead."""
        proposer = self.subjects.handoff_proposer(msg.subject) or GATE_PLUGIN
        try:
            await self._decide_handed(msg, proposer)
        except BUS_UNAVAILABLE as exc:  # a refusal record the bus could not store: the stored copy gets one
            log.warning("gate.retry_later", plugin=proposer, error=f"{type(exc).__name__}: {exc}", handed=True)
            with contextlib.suppress(Exception):
                await handoff.answer(msg, retry=handoff.BUS_UNAVAILABLE)

    async def _decide_handed(self, msg: Msg, proposer: str) -> None:
        limit = self.config.gate.proposal_rates.get(proposer, self.config.gate.proposal_rate)
        ref = (msg.headers or {}).get(MSG_ID_HEADER) or new_id()
        if not self.rates.admit(proposer, ref, time.time(), limit, self.config.gate.proposal_rate_window_s):
            await handoff.answer(msg, decided=0)  # over the plugin's rate: dropped, as a stored one would be
            return
        try:
            proposal = parse_proposal(msg.data, self.config.gate.max_payload)
        except TuxPilotError as exc:
            await self.refuse(exc, proposer)
            await handoff.answer(msg, decided=1)
            return
        if await self.settled.settled(proposer, proposal.id):  # handed over again (a redelivered event)
            await handoff.answer(msg, decided=0)
            return
        if self.busy(proposer) or sum(self.in_flight.values()) >= self.config.gate.max_concurrency:
            await handoff.answer(msg, retry=handoff.BUSY)  # it waits in the stream, not in our slots
            return
        self.settled.begin(proposer, proposal.id)
        decided = False
        try:
            results = await self.handle_proposal(proposal, proposer)
            decided = True
        except BUS_UNAVAILABLE as exc:
            log.warning("gate.retry_later", proposal_id=proposal.id, plugin=proposer,
                        error=f"{type(exc).__name__}: {exc}", handed=True)
            await handoff.answer(msg, retry=handoff.BUS_UNAVAILABLE)
            return
        except Exception as exc:  # as on the stored path: said on the record, not retried forever
            log.exception("gate.failed", proposal_id=proposal.id, plugin=proposer)
            results = [await self.refuse(
                TuxPilotError(f"the gate failed on this proposal: {error_doc(exc)['message']}"), proposer)]
            decided = True
        finally:
            self.settled.end(proposer, proposal.id, decided)
        await handoff.answer(msg, decided=len(results))

    async def handle(self, raw: bytes, proposer: str | None = None) -> list[Result]:
        """Take one raw proposal through the gate; returns the recorded results.

        `proposer` is the plugin whose proposal subject the bytes came on. In-process callers that
        leave it out vouch for the body's `plugin` themselves; the bus path always reads the subject.
        """
        try:
            proposal = parse_proposal(raw, self.config.gate.max_payload)
        except TuxPilotError as exc:
            return [await self.refuse(exc, proposer)]
        return await self.handle_proposal(proposal, proposer or proposal.plugin)

    async def refuse(self, exc: TuxPilotError, proposer: str | None = None) -> Result:
        """The record of a proposal too broken to name its plugin and action."""
        result = Result(
            status=Status.refused, reason=exc.code, message=exc.message, error=ErrorDoc.model_validate(exc.to_doc()),
            host=self.subjects.host, proposed_by=proposer, source=Source.proposal, time=now(),
        )
        await self.record(result, GATE_PLUGIN, GATE_ACTION)
        return result

    async def handle_proposal(self, proposal: Proposal, proposer: str) -> list[Result]:
        self.in_flight[proposer] = self.in_flight.get(proposer, 0) + 1
        try:
            results = []
            for action in proposal.actions:
                case = Case(
                    source=Source.proposal, plugin=action.plugin, action=action.action, params=action.params,
                    id=action_id(proposal.event_id, action.plugin, action.action, action.params),
                    proposer=proposer, proposal=proposal, resource=action.resource,
                )
                results.append(await self.decide(case))
            return results
        finally:
            self.in_flight[proposer] -= 1

    async def decide(self, case: Case) -> Result:
        """The steps, then execution; whatever happens, one record."""
        try:
            await run_steps(self.steps, self, case)
            result = await self.execute(case)
        except Stop as stop:
            error = ErrorDoc.model_validate(stop.error) if stop.error else None
            result = Result(status=stop.status, reason=stop.reason, message=stop.message, error=error)
        finally:
            if case.lease is not None:
                await self.leases.release(case.lease)
        result = self.stamp(result, case)
        log.info("gate.decided", source=case.source.value, plugin=case.plugin, action=case.action, action_id=case.id,
                 event_id=case.event_id, proposed_by=case.proposer, caller=case.caller, status=result.status.value,
                 reason=result.reason, ms=result.duration_ms)
        await self.record(result, case.plugin, case.action)
        recorded = self._recording.pop(case.id, None)
        if recorded is not None:
            recorded.set()
        return result

    def stamp(self, result: Result, case: Case) -> Result:
        """The record: the outcome, and who asked for what. Large params are kept as their size and hash."""
        size, digest = params_digest(case.params)
        small = size <= self.config.gate.record_params_max_bytes
        proposal = case.proposal
        return result.model_copy(
            update={
                "id": case.id,
                "host": self.subjects.host,
                "plugin": case.plugin,
                "action": case.action,
                "params": case.params if small else None,
                "params_bytes": None if small else size,
                "params_sha256": None if small else digest,
                "event_id": case.event_id,
                "proposal_id": proposal.id if proposal is not None else None,
                "proposed_by": case.proposer,
                "source": case.source,
                "caller": case.caller,
                "approved_by": case.approved_by,
                "time": now(),
                "duration_ms": round((time.perf_counter() - case.started) * 1000, 3),
            }
        )

    # -- execution -----------------------------------------------------------------------------------

    async def execute(self, case: Case) -> Result:
        """Request the owning plugin's private endpoint; map silence and refusals to results."""
        assert case.spec is not None
        timeout = case.spec.timeout_s or self.config.gate.action_timeout_s
        subject, body = self.subjects.exec(case.plugin, case.action), json.dumps(case.params).encode()
        headers = {ACTION_ID_HEADER: case.id}
        if case.event_id:
            headers[EVENT_ID_HEADER] = case.event_id
        # No responders means the request reached nobody: safe to ask again while a plugin
        # (re)subscribes, for example just after the server came back.
        patience = asyncio.get_running_loop().time() + self.config.gate.unavailable_retry_s
        while True:
            try:
                msg = await self.executor.request(subject, body, headers, wait_s=timeout)
                case.reply = msg
                return reply_to_result(msg)
            except NoRespondersError:
                if asyncio.get_running_loop().time() < patience:
                    await asyncio.sleep(UNAVAILABLE_RETRY_S)
                    continue
                message = f"no {case.plugin} instance is serving {case.action}"
                return Result(status=Status.unavailable, reason=Reason.no_responders, message=message)
            except (NatsTimeout, TimeoutError):
                # The action may still run and answer: its reply is recorded as a follow-up outcome.
                self._recording[case.id] = asyncio.Event()
                self.executor.watch(case.id, case)
                return Result(status=Status.timeout, reason=Reason.timeout, message=f"no reply within {timeout} s")
            except Exception as exc:
                return Result(status=Status.error, reason=Reason.internal, message=error_doc(exc)["message"])

    async def _on_late(self, case: Case, msg: Msg) -> None:
        """A reply after the timeout was recorded: the same action id gets its real outcome."""
        recorded = self._recording.get(case.id)
        if recorded is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorded.wait(), LATE_RECORD_WAIT_S)
        result = self.stamp(reply_to_result(msg), case).model_copy(update={"late": True})
        log.warning("gate.late_reply", plugin=case.plugin, action=case.action, action_id=case.id,
                    status=result.status.value, ms=result.duration_ms)
        await self.record(result, case.plugin, case.action)

    # -- the public action endpoint ------------------------------------------------------------------

    async def _serve(self) -> None:
        """`tuxpilot-gate`: one endpoint per installed plugin's action, its contract in the metadata."""
        self.service = await add_service(
            self.nc,
            name=GATE_SERVICE,
            version=_service_version(),
            description=f"TuxPilot's gate on {self.subjects.host}: every action call is checked and audited",
            metadata={KIND_KEY: GATE_KIND, "host": self.subjects.host},
            queue_group=gate_queue(self.subjects.host),
        )
        for _, manifest in sorted(self.registry.all().items()):
            await self._serve_actions(manifest)

    async def add_plugin(self, manifest: Manifest) -> None:
        """A plugin loaded while the agent runs: decided from this manifest, its actions served."""
        await self.registry.add(manifest)
        await self._serve_actions(manifest)

    async def _serve_actions(self, manifest: Manifest) -> None:
        if self.service is None:
            return
        for action, spec in sorted(manifest.actions.items()):
            if (manifest.name, action) in self._served:
                continue  # an endpoint stays; the steps decide from the manifest in force
            self._served.add((manifest.name, action))
            await self.service.add_endpoint(
                name=f"{manifest.name}-{action}",
                subject=self.subjects.act(manifest.name, action),
                handler=self._endpoint(manifest.name, action),
                metadata={
                    "plugin": manifest.name,
                    "action": action,
                    "description": spec.description[:256],
                    "params": json.dumps(spec.params, sort_keys=True),
                    "permission": spec.permission.value if spec.permission else "",
                    "timeout_s": f"{spec.timeout_s or self.config.gate.action_timeout_s:g}",
                    "dry_run": "true" if spec.dry_run else "false",
                },
            )

    def _endpoint(self, plugin: str, action: str) -> Any:
        async def handle(req: Request) -> None:
            # Handlers of one subscription run one at a time: answer each call in its own task.
            await self._call_slots.acquire()
            task = asyncio.create_task(self.call(req, plugin, action), name="gate-call")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

        return handle

    async def serve_call(self, req: Request, plugin: str, action: str) -> None:
        """A call that reached this gate another way (a fleet-wide call targeting this host): handled
        exactly as one on this host's own endpoint."""
        await self._endpoint(plugin, action)(req)

    async def call(self, req: Request, plugin: str, action: str) -> None:
        """An operator's call: the same steps as a proposal, one record, and a reply in the usual shapes."""
        try:
            reply_to = req._msg.reply
            case = Case(source=Source.operator, plugin=plugin, action=action, params={}, id=new_id(),
                        caller=caller_of(reply_to))
            try:
                if not reply_to:
                    # Nobody would hear the outcome, and nothing names the caller: not acted on.
                    raise Stop(Status.refused, Reason.no_caller, "a call must be a request with a reply inbox")
                case.params = schemas.parse_params(req.data, MAX_CALL_BYTES)
            except TuxPilotError as exc:
                reason = Reason(exc.code) if exc.code in Reason.__members__ else Reason.bad_request
                stop = Stop(Status.refused, reason, exc.message, exc.to_doc())
                result = await self._record_stop(stop, case)
            except Stop as stop:
                result = await self._record_stop(stop, case)
            else:
                result = await self.decide(case)
            if reply_to:
                body, headers = self._reply(result, case)
                await req.respond(body, headers=headers)
        except Exception as exc:  # the caller still gets an answer, and the gate lives on
            log.exception("gate.call_failed", plugin=plugin, action=action)
            with contextlib.suppress(Exception):
                body, headers = _error_reply("internal", f"the gate failed on this call: {error_doc(exc)['message']}")
                await req.respond(body, headers=headers)
        finally:
            self._call_slots.release()

    async def _record_stop(self, stop: Stop, case: Case) -> Result:
        error = ErrorDoc.model_validate(stop.error) if stop.error else None
        result = self.stamp(Result(status=stop.status, reason=stop.reason, message=stop.message, error=error), case)
        log.info("gate.decided", source=case.source.value, plugin=case.plugin, action=case.action, action_id=case.id,
                 caller=case.caller, status=result.status.value, reason=result.reason)
        await self.record(result, case.plugin, case.action)
        return result

    def _reply(self, result: Result, case: Case) -> tuple[bytes, dict[str, str] | None]:
        """What the caller gets: the plugin's own reply when it ran, else the gate's verdict."""
        msg: Msg | None = case.reply
        if msg is not None and result.status in (Status.ok, Status.error):
            headers = {k: v for k, v in (msg.headers or {}).items() if k in (ERROR_HEADER, ERROR_CODE_HEADER)}
            return msg.data or Result(status=result.status).to_json(), headers or None
        if result.status is Status.dry_run:
            verdict = Result(id=result.id, status=result.status, reason=result.reason, message=result.message)
            return verdict.to_json(), None
        code = result.reason or "internal"
        details = result.error.details if result.error is not None and result.error.details else None
        return _error_reply(code, result.message or result.status.value, details)

    # -- records -------------------------------------------------------------------------------------

    async def _summarise_rates(self) -> None:
        while True:
            await asyncio.sleep(RATE_SUMMARY_POLL_S)
            for window in self.rates.due(time.time()):
                await self._record_rate_summary(window)

    async def _record_rate_summary(self, window: Window) -> None:
        started = window.start
        result = Result(
            id=f"rate-{window.plugin}-{int(started)}-{window.summaries}"[:128],
            status=Status.refused,
            reason=Reason.rate_limited,
            message=(f"{window.dropped} proposals of {window.plugin} beyond its limit of {window.limit} per "
                     f"{window.window_s:g} s were dropped, not decided"),
            data={
                "dropped": window.dropped,
                "admitted": window.admitted,
                "limit": window.limit,
                "window_s": window.window_s,
                "window_start": datetime.fromtimestamp(started, UTC).isoformat(),
                "first_proposal": window.first_dropped,
                "last_proposal": window.last_dropped,
            },
            host=self.subjects.host, plugin=window.plugin, action=PROPOSALS_ACTION, proposed_by=window.plugin,
            source=Source.proposal, time=now(),
        )
        log.warning("gate.rate_limited", plugin=window.plugin, dropped=window.dropped, limit=window.limit,
                    window_s=window.window_s)
        await self.record(result, window.plugin, PROPOSALS_ACTION)

    async def record(self, result: Result, plugin: str, action: str) -> None:
        """Store the outcome in the audit stream; retried through a reconnect, deduplicated by id."""
        subject = self.subjects.result(plugin, action)
        try:
            body = result.to_json()
        except ValueError as exc:  # data a plugin returned that JSON cannot carry
            log.error("gate.unrecordable", plugin=plugin, action=action, action_id=result.id, error=str(exc)[:200])
            result = result.model_copy(update={
                "status": Status.error, "reason": Reason.unrecordable, "data": None, "artifacts": None, "error": None,
                "message": f"the outcome ({result.status.value}) could not be recorded as JSON: {str(exc)[:200]}",
            })
            body = result.to_json()
        msg_id = f"{result.id}-{result.status.value}{'-late' if result.late else ''}"
        headers = {MSG_ID_HEADER: msg_id} if result.id else None
        for attempt in range(RECORD_ATTEMPTS):
            try:
                await self.ledger.stored.publish(subject, body, headers, wait_s=2.0)
                return
            except Exception as exc:
                log.warning("gate.record_retry", plugin=plugin, action=action, attempt=attempt, error=str(exc)[:200])
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        log.error("gate.record_failed", plugin=plugin, action=action, action_id=result.id)


def _error_reply(code: str, message: str, details: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """An `error` document, with the NATS micro error headers carrying the same code and message."""
    doc: dict[str, Any] = {"code": code, "message": message[:4096]}
    if details:
        doc["details"] = details
    description = message[:1000].replace("\n", " ").replace("\r", " ")
    status = str(STATUS_CODES.get(code, 500))
    return json.dumps(doc).encode(), {ERROR_HEADER: description, ERROR_CODE_HEADER: status}
