"""`tuxpilot plugin test`: a conformance check of a plugin against its own manifest on an embedded server
and agent (after the plugin's own tests, tuxpilot.pdk.owntests).

What tests/conformance checks of the SDKs with its own test plugin, asked here of any plugin with what
its manifest declares: discovery (`$SRV.PING/INFO/STATS` and their metadata), the agent's registry
entry, each action's replies (a well-formed request gets a `result` or a structured `error`; a body
that is not a JSON object gets `bad_request`, params against the schema `invalid_params`, both with
the micro error headers; a repeated action id gets the first reply), each subscribed event type's
proposal (schema-valid, its id derived from the event's, only the plugin's own declared actions with
params their schema takes), and garbage or a bare event on its subjects neither redelivered nor
crashing the plugin. Works from an installed wheel: it needs no file of the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from tuxpilot.pdk.embedded import Embedded, embedded
from tuxpilot.protocol import schemas
from tuxpilot.protocol.manifest import DANGEROUS, Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import MSG_ID_HEADER, proposal_id, registry_key

METADATA_KEYS = {"tuxpilot", "host", "plugin", "version", "instance", "api_version", "user", "pid"}
ACK_WAIT_S = 1.0
BACKOFF_S = 2.0


@dataclass
class Finding:
    """One check: what was checked, whether it held, and why not (or a note when it was skipped)."""

    check: str
    ok: bool
    detail: str = ""
    skipped: bool = False


@dataclass
class Report:
    plugin: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.ok for f in self.findings)

    def add(self, check: str, ok: bool, detail: str = "", *, skipped: bool = False) -> Finding:
        found = Finding(check, ok, detail, skipped)
        self.findings.append(found)
        return found


async def check(folder: Path, *, call_permitted: bool = False, verbose: bool = False) -> Report:
    """Start the plugin on an embedded server and agent, and check it against its manifest.

    An action that needs a dangerous permission (it may change the host) is sent only requests that are
    refused before its handler runs, unless `call_permitted`."""
    manifest = load_manifest(folder)
    report = Report(manifest.name)
    # The check sends garbage on purpose: the plugin's warnings about it are expected, not news.
    quiet = {} if verbose else {"TUXPILOT_LOG_LEVEL": "error"}
    async with embedded(folder, ack_wait_s=ACK_WAIT_S, backoff_s=BACKOFF_S, extra=quiet) as rig:
        ping = await _discovery(rig, report)
        await _registry(rig, report)
        for action in sorted(manifest.actions):
            await _action(rig, report, action, call_permitted=call_permitted)
        for pattern in manifest.subscribes:
            await _event(rig, report, pattern)
        await _garbage(rig, report)
        await _still_serving(rig, report, ping)
    return report


def _meta_problems(doc: dict[str, Any], rig: Embedded) -> list[str]:
    meta = doc.get("metadata") or {}
    problems = [f"missing metadata {sorted(METADATA_KEYS - set(meta))}"] if not set(meta) >= METADATA_KEYS else []
    want = {"tuxpilot": "plugin", "host": rig.subjects.host, "plugin": rig.name, "version": rig.manifest.version,
            "api_version": rig.manifest.api_version}
    problems += [f"metadata {k}={meta.get(k)!r}, the manifest says {v!r}" for k, v in want.items()
                 if k in meta and meta[k] != v]
    if (doc.get("name"), doc.get("version")) != (rig.name, rig.manifest.version):
        problems.append(f"service {doc.get('name')} {doc.get('version')}, the manifest says {rig.name} "
                        f"{rig.manifest.version}")
    return problems


async def _discovery(rig: Embedded, report: Report) -> dict[str, Any]:
    pings = await rig.discover("PING")
    ping = pings[0] if pings else {}
    problems = _meta_problems(ping, rig) if pings else ["no PING answer"]
    if len(pings) > 1:
        problems.append(f"{len(pings)} instances answered; one was started")
    report.add("discovery: PING names the plugin with the protocol's metadata", not problems, "; ".join(problems))
    infos = await rig.discover("INFO")
    problems = []
    if not infos:
        problems.append("no INFO answer")
    else:
        endpoints = {e.get("name"): e for e in infos[0].get("endpoints") or []}
        if set(endpoints) != set(rig.manifest.actions):
            problems.append(f"endpoints {sorted(map(str, endpoints))}, the manifest declares "
                            f"{sorted(rig.manifest.actions)}")
        for action, endpoint in endpoints.items():
            if action in rig.manifest.actions and endpoint.get("subject") != rig.subjects.exec(rig.name, action):
                problems.append(f"{action} is served on {endpoint.get('subject')}, not its exec subject")
            if endpoint.get("queue_group") != rig.name:
                problems.append(f"{action} is in queue group {endpoint.get('queue_group')!r}, not {rig.name!r}")
    report.add("discovery: INFO lists one endpoint per action, on its exec subject, in the plugin's queue group",
               not problems, "; ".join(problems))
    return ping


async def _registry(rig: Embedded, report: Report) -> None:
    from nats.js.errors import KeyNotFoundError

    from tuxpilot.protocol.registry import RegistryEntry

    kv = await rig.operator.jetstream().key_value(rig.names.plugins)
    try:
        entry = RegistryEntry.from_json((await kv.get(registry_key(rig.subjects.host, rig.name))).value or b"")
    except KeyNotFoundError:
        report.add("registry: the agent's entry holds the manifest it loaded", False, "no entry")
        return
    same = entry.manifest.to_doc() == rig.manifest.to_doc()
    report.add("registry: the agent's entry holds the manifest it loaded", same, "" if same else "they differ")


def example_params(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Params to send an action: its schema's `examples`, else one built from the schema (defaults,
    then each required property from its `const`, `enum`, `default`, `examples` or type)."""
    found = [e for e in schema.get("examples") or [] if isinstance(e, dict)]
    if found:
        return found
    props = schema.get("properties") or {}
    return [{key: _value_for(props.get(key) or {}) for key in schema.get("required") or []}]


def _value_for(spec: dict[str, Any]) -> Any:
    for key in ("const", "default"):
        if key in spec:
            return spec[key]
    for key in ("enum", "examples"):
        if spec.get(key):
            return spec[key][0]
    kind = spec.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "string":
        return "x" * max(1, int(spec.get("minLength", 1)))
    if kind in ("integer", "number"):
        return spec.get("minimum", spec.get("exclusiveMinimum", -1) + 1)
    if kind == "boolean":
        return False
    if kind == "array":
        return []
    if kind == "object":
        return example_params(spec)[0]
    return None


def _wrong_params(schema: dict[str, Any]) -> dict[str, Any] | None:
    """Params the schema refuses, when one can be named: a declared property given a value of another type."""
    for key, spec in (schema.get("properties") or {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        wrong = {"string": 12345, "integer": "twelve", "number": "twelve", "boolean": "no", "array": 7,
                 "object": 7}.get(kind if isinstance(kind, str) else "")
        if wrong is not None:
            return {key: wrong}
    if schema.get("additionalProperties") is False:
        return {"not-a-declared-property": 1}
    return None


def _reply(msg: Msg) -> tuple[dict[str, Any] | None, str]:
    """The reply's document and what is wrong with it, if anything: a `result` without error headers, or
    an `error` whose code and message the micro headers repeat."""
    try:
        doc = json.loads(msg.data)
    except ValueError:
        return None, f"not JSON: {msg.data[:80]!r}"
    if not isinstance(doc, dict):
        return None, "not a JSON object"
    headers = msg.headers or {}
    if "code" in doc:
        problems = schemas.validator("error").errors(doc)
        if problems:
            return doc, f"an error document that fails its schema at {problems[0]['path']}: {problems[0]['message']}"
        if not headers.get(ERROR_CODE_HEADER) or not headers.get(ERROR_HEADER):
            return doc, "an error document without the Nats-Service-Error(-Code) headers"
        return doc, ""
    problems = schemas.validator("result").errors(doc)
    if problems:
        return doc, f"a result that fails its schema at {problems[0]['path']}: {problems[0]['message']}"
    if headers.get(ERROR_CODE_HEADER):
        return doc, f"a result with an error header ({headers.get(ERROR_CODE_HEADER)})"
    return doc, ""


async def _ask(rig: Embedded, action: str, body: bytes | dict[str, Any], action_id: str | None = None,
               ) -> tuple[Msg | None, str]:
    timeout = (rig.manifest.actions[action].timeout_s or 10.0) + 2.0
    try:
        return await rig.request(action, body, action_id=action_id, timeout_s=timeout), ""
    except NoRespondersError:
        return None, "no responders"
    except (TimeoutError, NatsTimeout):
        return None, f"no reply within {timeout:g} s"


async def _action(rig: Embedded, report: Report, action: str, *, call_permitted: bool) -> None:
    spec = rig.manifest.actions[action]
    schema = spec.params
    # Refused before the handler runs: safe to send to any action.
    for body, what in ((b"{nope", "not JSON"), (b"[1, 2]", "a JSON array")):
        msg, failure = await _ask(rig, action, body)
        doc, problem = _reply(msg) if msg is not None else (None, failure)
        code = (msg.headers or {}).get(ERROR_CODE_HEADER) if msg is not None else None
        ok = not problem and doc is not None and doc.get("code") == "bad_request" and code == "400"
        report.add(f"{action}: a body that is {what} is refused bad_request (400)", ok,
                   "" if ok else problem or f"got {json.dumps(doc)[:200]} ({code})")
    wrong = _wrong_params(schema)
    if wrong is not None:
        msg, failure = await _ask(rig, action, wrong)
        doc, problem = _reply(msg) if msg is not None else (None, failure)
        ok = not problem and doc is not None and doc.get("code") == "invalid_params"
        report.add(f"{action}: params its schema refuses ({json.dumps(wrong)}) are invalid_params (400)", ok,
                   problem or (f"got {json.dumps(doc)[:200]}" if not ok else ""))
    if spec.permission in DANGEROUS and not call_permitted:
        report.add(f"{action}: well-formed requests", True, f"not sent: it needs {spec.permission.value}, so it "
                   "may change this host (--call-permitted sends them)", skipped=True)
        return
    validator = rig.manifest.params_validator(action)
    for params in example_params(schema):
        refused = validator.errors(params)
        if refused:
            report.add(f"{action}: well-formed request {json.dumps(params)[:120]}", False,
                       f"the example is not valid params ({refused[0]['path']}: {refused[0]['message']}); give valid "
                       "`examples` in the params schema")
            continue
        action_id = f"pdk-check-{action}-{abs(hash(json.dumps(params, sort_keys=True))) % 10**9}"
        msg, failure = await _ask(rig, action, params, action_id)
        doc, problem = _reply(msg) if msg is not None else (None, failure)
        if not problem and doc is not None and "code" not in doc and spec.result is not None:
            result_problems = schemas.Validator(spec.result, what=f"result of {action}").errors(doc.get("data"))
            if result_problems:
                problem = f"data fails the declared result schema at {result_problems[0]['path']}"
        outcome = "" if doc is None else f"error {doc['code']}" if "code" in doc else f"status {doc.get('status')}"
        report.add(f"{action}: well-formed request {json.dumps(params)[:120]} gets a result or a structured error",
                   not problem, problem or outcome)
        if msg is not None and not problem:
            again, failure = await _ask(rig, action, params, action_id)
            same = again is not None and again.data == msg.data
            report.add(f"{action}: the same action id again gets the first reply", same,
                       "" if same else failure or "a different reply")


def _concrete(pattern: str) -> str:
    """An event type the pattern matches: `*` becomes `pdk-check`."""
    return ".".join("pdk-check" if part == "*" else part for part in pattern.split("."))


async def _wait_acked(rig: Embedded, seq: int, limit: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        info = await rig.consumer()
        if info.ack_floor is not None and info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0:
            return True
        await asyncio.sleep(0.1)
    return False


async def _deliveries(rig: Embedded) -> int:
    """How many deliveries the plugin's consumer made, redeliveries included."""
    delivered = (await rig.consumer()).delivered
    return delivered.consumer_seq if delivered is not None else 0


async def _event(rig: Embedded, report: Report, pattern: str) -> None:
    event_type = _concrete(pattern)
    proposals: asyncio.Queue[Msg] = asyncio.Queue()

    async def seen(msg: Msg) -> None:
        await proposals.put(msg)

    sub = await rig.operator.subscribe(rig.subjects.proposal(rig.name), cb=seen)
    handed = await rig.operator.subscribe(rig.subjects.handoff(rig.name), cb=seen)
    try:
        event = Event.new(event_type, rig.subjects.host, source="pdk", value=95.0, threshold=90.0, unit="%",
                          resource="pdk-check")
        seq = await rig.publish_event(event)
        acked = await _wait_acked(rig, seq, ACK_WAIT_S + BACKOFF_S + 3.0)
        await asyncio.sleep(0.2)  # a proposal is published before the ack; let its delivery land
    finally:
        await sub.unsubscribe()
        await handed.unsubscribe()
    report.add(f"event {event_type}: acked, not redelivered", acked,
               "" if acked else "not acked: the handler failed or hung (the event comes back after its backoff)")
    found: list[Msg] = []
    while not proposals.empty():
        found.append(proposals.get_nowait())
    mine = [m for m in found if _event_id(m) == event.id]
    if not mine:
        report.add(f"event {event_type}: its proposal", True, "it proposes nothing for this event", skipped=True)
        return
    problems = [p for m in mine for p in _proposal_problems(m, event, rig.manifest)]
    report.add(f"event {event_type}: its proposal is valid, for its own declared actions with valid params",
               not problems, "; ".join(sorted(set(problems))))


def _event_id(msg: Msg) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        doc = json.loads(msg.data)
        return str(doc.get("event_id"))
    return None


def _proposal_problems(msg: Msg, event: Event, manifest: Manifest) -> list[str]:
    doc = json.loads(msg.data)
    problems = [f"fails the proposal schema at {p['path']}: {p['message']}" for p in
                schemas.validator("proposal").errors(doc)[:1]]
    expected = proposal_id(event.id, manifest.name)
    if doc.get("id") != expected or (msg.headers or {}).get(MSG_ID_HEADER) != expected:
        problems.append(f"its id and message id must be {expected} (the gate dedups redeliveries by it)")
    for item in doc.get("actions") or []:
        owner, action = item.get("plugin", manifest.name), item.get("action")
        if owner != manifest.name:
            problems.append(f"proposes {owner}.{action}, another plugin's action (the gate refuses foreign_action)")
        elif action not in manifest.actions:
            problems.append(f"proposes {action!r}, which its manifest does not declare")
        else:
            refused = manifest.params_validator(action).errors(item.get("params") or {})
            if refused:
                problems.append(f"proposes {action} with params its schema refuses "
                                f"({refused[0]['path']}: {refused[0]['message']})")
    return problems


async def _garbage(rig: Embedded, report: Report) -> None:
    event_type = _concrete(rig.manifest.subscribes[0]) if rig.manifest.subscribes else None
    if event_type is None:
        report.add("garbage on its event subjects", True, "it subscribes to no events", skipped=True)
        return
    for body, what in ((b"not json{", "garbage"), (b'{"id": 1}', "a document that is not an event")):
        seq = await rig.publish_raw(event_type, body)
        answered = await _wait_acked(rig, seq, ACK_WAIT_S + 3.0)
        before = await _deliveries(rig)
        await asyncio.sleep(ACK_WAIT_S + 0.5)  # long enough for an unanswered message to come back
        again = await _deliveries(rig) != before
        ok = answered and not again
        report.add(f"{what} on {event_type}: terminated, not redelivered", ok,
                   "" if ok else "it was not answered" if not answered else "it was delivered again")
    bare = Event.new(event_type, rig.subjects.host, source="pdk")  # no value, resource, data: all optional
    seq = await rig.publish_event(bare)
    ok = await _wait_acked(rig, seq, ACK_WAIT_S + BACKOFF_S + 3.0)
    report.add(f"a bare {event_type} event (no value, resource or data): handled and acked", ok,
               "" if ok else "not acked: the handler fails on an event without its optional fields, which comes "
               "back after every backoff")


async def _still_serving(rig: Embedded, report: Report, ping: dict[str, Any]) -> None:
    pings = await rig.discover("PING")
    sup = rig.supervised()
    restarts = sup.restarts if sup is not None else 0
    same = bool(pings) and pings[0].get("id") == ping.get("id")
    ok = same and restarts == 0
    detail = "" if ok else (f"it exited {restarts} time(s) ({sup.last_exit})" if restarts and sup is not None
                            else "a different instance answers now" if pings else "it no longer answers PING")
    report.add("the plugin is still serving, never restarted", ok, detail)
    if ok:
        stats = await rig.discover("STATS")
        served = sum(int(e.get("num_requests", 0)) for e in (stats[0].get("endpoints") or [])) if stats else 0
        report.add("discovery: STATS counts the requests served", bool(stats) and (served > 0 or not
                   rig.manifest.actions), "" if stats else "no STATS answer")
