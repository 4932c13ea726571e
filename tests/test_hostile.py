"""Hostile input on every subject a stranger can publish to, against a real nats-server.

A stranger holding a NATS connection can request the plugins' action endpoints, publish proposals
to the gate, and publish events that the plugins' durable consumers read. Whatever they send:

- an action request gets a reply: a non-empty JSON body, an `error` document with the
  `Nats-Service-Error-Code` header set (or a `result` document), and the plugin stays up;
- a proposal gets one audit record per action (or one refusal for an unreadable proposal) on
  `tuxpilot.result.<host>.>`, valid under result.json, and the gate keeps deciding good proposals;
- an event never kills the plugin's durable consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from tuxpilot.agent.config import Config, load_config
from tuxpilot.agent.gate import Gate, parse_proposal
from tuxpilot.agent.registry import Registry
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer
from tuxpilot.log import setup as setup_logging
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import STATUS_CODES, TuxPilotError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.models import Event, new_id
from tuxpilot.sdk.plugin import MAX_PARAMS_BYTES, Context, Plugin

from tests.test_gate import DEMO, demo_plugin, proposal

HOST = "test-host"
ECHO = f"tuxpilot.exec.{HOST}.demo.echo"
NOTE = f"tuxpilot.exec.{HOST}.ticker.note"
PROPOSALS = f"tuxpilot.proposal.{HOST}.demo"  # the stranger holds demo's publish rights
HANDOFF = f"tuxpilot.propose.{HOST}.demo"  # demo's proposals handed to the gate by request
RESULTS = f"tuxpilot.result.{HOST}.>"
TICK = f"tuxpilot.evt.{HOST}.demo.tick"
CODE_HEADER = "Nats-Service-Error-Code"
TEXT_HEADER = "Nats-Service-Error"
GATE = "gate.proposal"  # where refusals of unreadable proposals are filed

ERROR_SCHEMA = schemas.validator("error")
RESULT_SCHEMA = schemas.validator("result")

# A second plugin with an event handler (demo subscribes demo.* but handles nothing) and an action
# with a required param.
TICKER = {
    **DEMO,
    "name": "ticker",
    "permissions": ["filesystem_read"],
    "subscribes": ["demo.*"],
    "actions": {
        "note": {
            "permission": "filesystem_read",
            "params": {
                "type": "object",
                "required": ["text"],
                "additionalProperties": False,
                "properties": {"text": {"type": "string", "maxLength": 200}},
            },
        },
    },
}


@dataclass
class Ticker:
    plugin: Plugin
    ticks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def ticker_plugin() -> Ticker:
    ticker = Ticker(Plugin(Manifest.from_doc(TICKER)))

    @ticker.plugin.on("demo.tick")
    async def tick(event: Event, ctx: Context) -> list[Any]:
        ticker.ticks.append(event.id)
        return [ctx.propose("note", {"text": event.id})]

    @ticker.plugin.action("note")
    async def note(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
        ticker.notes.append(params["text"])
        return {"text": params["text"]}

    return ticker


@pytest.fixture(autouse=True, scope="module")
def production_logging() -> Iterator[None]:
    """Log as the agent and plugins do (plain tracebacks), not with structlog's development default.

    That default renders tracebacks with rich and every local variable: for a 500-deep document it
    takes seconds, blocking the event loop, which is not what runs in production.
    """
    saved = structlog.get_config()
    setup_logging("info", "console")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(), cache_logger_on_first_use=False)
    yield
    structlog.configure(**saved)


# -- watching and asking -------------------------------------------------------------------------


async def until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@dataclass
class Record:
    where: str  # "<plugin>.<action>" of the result subject
    doc: dict[str, Any]

    @property
    def brief(self) -> tuple[str, str, str | None]:
        return self.where, self.doc.get("status", "?"), self.doc.get("reason")


class Records:
    """Every audit record on the host's result subjects; each one checked against result.json."""

    def __init__(self) -> None:
        self.seen: list[Record] = []
        self.invalid: list[str] = []

    async def start(self, nc: Client) -> None:
        await nc.subscribe(RESULTS, cb=self._on, pending_msgs_limit=1_000_000)
        await nc.flush()

    async def _on(self, msg: Msg) -> None:
        where = msg.subject.removeprefix(f"tuxpilot.result.{HOST}.")
        try:
            doc = json.loads(msg.data)
        except ValueError as exc:
            self.invalid.append(f"{where}: not JSON ({exc}): {msg.data[:200]!r}")
            return
        if not RESULT_SCHEMA.is_valid(doc):
            self.invalid.append(f"{where}: {RESULT_SCHEMA.errors(doc)[:3]}: {msg.data[:300]!r}")
        self.seen.append(Record(where, doc if isinstance(doc, dict) else {}))

    def of(self, proposal_id: str) -> list[Record]:
        return [r for r in self.seen if r.doc.get("proposal_id") == proposal_id]


async def ask(nc: Client, subject: str, body: bytes, timeout: float = 5.0) -> Msg:
    try:
        return await nc.request(subject, body, timeout=timeout)
    except (NatsTimeout, TimeoutError):
        pytest.fail(f"no reply within {timeout} s on {subject} to {len(body)} bytes: {body[:120]!r}")


def error_reply(msg: Msg) -> dict[str, Any]:
    """What `nats req` shows: a non-empty JSON error document, with the micro error headers set."""
    assert msg.data, "empty reply body (it would end a `nats req --replies` collection)"
    doc: dict[str, Any] = json.loads(msg.data)
    assert ERROR_SCHEMA.is_valid(doc), (ERROR_SCHEMA.errors(doc), msg.data[:300])
    assert "Traceback" not in doc["message"], doc
    headers = msg.headers or {}
    assert headers.get(CODE_HEADER) == str(STATUS_CODES.get(doc["code"], 500)), (headers, doc)
    assert headers.get(TEXT_HEADER), headers
    return doc


def ok_reply(msg: Msg) -> dict[str, Any]:
    headers = msg.headers or {}
    assert CODE_HEADER not in headers, (headers, msg.data[:300])
    doc: dict[str, Any] = json.loads(msg.data)
    assert RESULT_SCHEMA.is_valid(doc), (RESULT_SCHEMA.errors(doc), msg.data[:300])
    assert doc["status"] == "ok", doc
    return doc


async def assert_plugins_answer(nc: Client) -> None:
    assert ok_reply(await ask(nc, ECHO, b'{"word": "alive"}'))["data"]["word"] == "alive"
    assert ok_reply(await ask(nc, NOTE, b'{"text": "alive"}'))["data"] == {"text": "alive"}


# -- the rig: two SDK plugins, the registry and the gate in-process, a stranger's connection --------


@dataclass
class Rig:
    nc: Client
    config: Config
    demo_calls: list[str]
    ticker: Ticker
    gate: Gate
    records: Records
    good_sent: int = 0

    def good_proposal(self) -> tuple[str, bytes]:
        self.good_sent += 1
        raw = proposal("echo", {"word": f"good{self.good_sent}"})
        return json.loads(raw)["id"], raw

    async def submit(self, stranger: Client, raw: bytes, n: int, timeout: float = 3.0, *,
                     handed: bool = False) -> list[Record]:
        """Publish `raw` (or hand it to the gate by request: its answer must say decided), then a good
        proposal; wait for the good one's `ok` and `n` other records."""
        before = len(self.records.seen)
        if handed:
            # A proposal and event id of its own: the stored variant stored these bytes already, and the
            # gate decides a handed-over proposal once per id (and claims an action once per event).
            raw = re.sub(rb'^\{"id":"[0-9a-f]+"', b'{"id":"' + new_id().encode() + b'"', raw)
            raw = raw.replace(b'"ev-1"', b'"ev-handed"')
            answer = json.loads((await stranger.request(HANDOFF, raw, timeout=timeout)).data)
            assert isinstance(answer.get("decided"), int), answer
        else:
            await stranger.publish(PROPOSALS, raw)
        good_id, good = self.good_proposal()
        await stranger.publish(PROPOSALS, good)
        await stranger.flush()

        def others() -> list[Record]:
            return [r for r in self.records.seen[before:] if r.doc.get("proposal_id") != good_id]

        await until(lambda: bool(self.records.of(good_id)) and len(others()) >= n, timeout)
        await asyncio.sleep(0.05)  # anything more would show up now (or in the next test's records)
        assert [r.brief for r in self.records.of(good_id)] == [("demo.echo", "ok", None)], "good traffic stalled"
        return others()


@contextlib.asynccontextmanager
async def running(nc: Client, config: Config) -> AsyncIterator[Rig]:
    config.gate.cooldown_s = 0
    config.gate.proposal_rate = 0  # floods on purpose; the rate limit has its own tests
    demo, calls = demo_plugin()
    ticker = ticker_plugin()
    records = Records()
    await records.start(nc)
    await demo.start(nc, config)
    await ticker.plugin.start(nc, config)
    registry = Registry(nc, demo.running.subjects, {"demo": demo.manifest, "ticker": ticker.plugin.manifest})
    await registry.start()
    gate = Gate(nc, config, registry)
    await gate.start()
    try:
        yield Rig(nc, config, calls, ticker, gate, records)
    finally:
        await gate.stop()
        await registry.stop()
        await ticker.plugin.stop()
        await demo.stop()


def host_config(url: str, state: Path) -> Config:
    return load_config(environ={"TUXPILOT_NATS_URL": url, "TUXPILOT_HOST_ID": HOST, "TUXPILOT_STATE_DIR": str(state)})


# One server, rig and stranger for the module's async tests (one each per test would cost more than
# the tests); every test asserts on what its own input caused.
SHARED = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("hostile") / "nats").start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(shared_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    nc = await nats.connect(shared_server.url, name="rig")
    try:
        async with running(nc, host_config(shared_server.url, tmp_path_factory.mktemp("state"))) as r:
            yield r
    finally:
        await nc.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stranger(shared_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(shared_server.url, name="stranger")
    yield client
    await client.close()


# -- hostile documents ---------------------------------------------------------------------------

DEEP_ARRAYS = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECTS = b'{"a":' * 40_000 + b"1" + b"}" * 40_000
# Deep enough to pass json.loads (under Python's recursion limit) and trip what comes after it.
MID_DEEP = b"[" * 500 + b"]" * 500
SURROGATE = b'"\\ud800"'  # a JSON-escaped lone surrogate: valid JSON syntax, not a Unicode string
BIG_INT = b"9" * 5000  # beyond Python's int-from-string limit (4300 digits)

BAD_REQUEST, INVALID = {"bad_request"}, {"invalid_params"}
CLIENT_FAULT = BAD_REQUEST | INVALID

ACTION_GARBAGE = [
    pytest.param(ECHO, b'{"word": "unterminated', BAD_REQUEST, id="malformed-json"),
    pytest.param(ECHO, b"{'word': 'single quotes'}", BAD_REQUEST, id="python-not-json"),
    pytest.param(ECHO, b"\xff\xfe\xfd\x80", BAD_REQUEST, id="invalid-utf8"),
    pytest.param(ECHO, b'{"word": "\xc3\x28"}', BAD_REQUEST, id="invalid-utf8-in-string"),
    pytest.param(ECHO, b"\x00\x00\x00\x00", BAD_REQUEST, id="nul-bytes"),
    pytest.param(ECHO, b'{"word": "a\x00b"}', BAD_REQUEST, id="raw-control-char-in-string"),
    pytest.param(ECHO, b"[1, 2, 3]", BAD_REQUEST, id="array"),
    pytest.param(ECHO, b'"word"', BAD_REQUEST, id="string"),
    pytest.param(ECHO, b"42", BAD_REQUEST, id="number"),
    pytest.param(ECHO, b"null", BAD_REQUEST, id="null"),
    pytest.param(ECHO, b"true", BAD_REQUEST, id="boolean"),
    pytest.param(ECHO, b"NaN", BAD_REQUEST, id="bare-nan"),
    pytest.param(ECHO, b'{"word": 5}', INVALID, id="wrong-type-number"),
    pytest.param(ECHO, b'{"word": ["a"]}', INVALID, id="wrong-type-array"),
    pytest.param(ECHO, b'{"word": null}', INVALID, id="wrong-type-null"),
    pytest.param(ECHO, b'{"word": NaN}', INVALID, id="nan-param"),
    pytest.param(ECHO, b'{"word": 1e999}', INVALID, id="infinite-param"),
    pytest.param(ECHO, b'{"word": "' + b"x" * 21 + b'"}', INVALID, id="too-long-string"),
    pytest.param(ECHO, b'{"nope": 1}', INVALID, id="unknown-field"),
    pytest.param(NOTE, b"{}", INVALID, id="missing-required-field"),
    pytest.param(NOTE, b'{"text": null}', INVALID, id="required-field-null"),
    pytest.param(NOTE, b"", INVALID, id="missing-required-field-empty-body"),
    pytest.param(ECHO, b'{"word": ' + BIG_INT + b"}", BAD_REQUEST, id="int-too-many-digits"),
    pytest.param(ECHO, DEEP_ARRAYS, BAD_REQUEST, id="100k-nested-arrays"),
    pytest.param(ECHO, DEEP_OBJECTS, BAD_REQUEST, id="40k-nested-objects"),
    pytest.param(ECHO, b'{"word": ' + DEEP_ARRAYS + b"}", BAD_REQUEST, id="100k-nested-in-a-field"),
    pytest.param(ECHO, b'{"word": ' + MID_DEEP + b"}", CLIENT_FAULT, id="500-nested-in-a-field"),
    pytest.param(ECHO, b'{"word": ' + SURROGATE + b"}", CLIENT_FAULT, id="lone-surrogate-value"),
    pytest.param(ECHO, b"{" + SURROGATE + b": 1}", CLIENT_FAULT, id="lone-surrogate-key"),
    pytest.param(ECHO, b'{"word": "' + b"\\ud800" * 30 + b'"}', CLIENT_FAULT, id="lone-surrogates-too-long"),
    # CESU-8: a surrogate as raw (invalid UTF-8) bytes, which json.loads lets through ("surrogatepass")
    pytest.param(ECHO, b'{"\xed\xa0\x80": 1}', CLIENT_FAULT, id="surrogate-as-raw-bytes-key"),
    pytest.param(
        ECHO, b'{"word": "' + b"x" * (MAX_PARAMS_BYTES + 16) + b'"}', {"payload_too_large"}, id="oversized-body"
    ),
]

ACTION_ODD_BUT_FINE = [
    pytest.param(b"", id="empty-body"),
    pytest.param(b" \n\t ", id="whitespace-body"),
    pytest.param(b'{"word": "a", "word": "b"}', id="duplicate-keys"),
    pytest.param(b'\xef\xbb\xbf{"word": "bom"}', id="utf8-bom"),
    pytest.param('{"word": "ünïcødé ✓"}'.encode(), id="non-ascii"),
]


@SHARED
@pytest.mark.parametrize(("endpoint", "body", "codes"), ACTION_GARBAGE)
async def test_action_endpoint_answers_garbage_with_an_error_document(
    rig: Rig, stranger: Client, endpoint: str, body: bytes, codes: set[str]
) -> None:
    assert len(body) < stranger.max_payload
    calls, notes = len(rig.demo_calls), len(rig.ticker.notes)
    doc = error_reply(await ask(stranger, endpoint, body))
    assert doc["code"] in codes, f"the caller's fault, answered as {doc}"
    await assert_plugins_answer(stranger)
    # the handlers never saw the garbage: only the liveness checks ran
    assert (len(rig.demo_calls) - calls, len(rig.ticker.notes) - notes) == (1, 1)


@SHARED
@pytest.mark.parametrize("body", ACTION_ODD_BUT_FINE)
async def test_action_endpoint_takes_odd_but_valid_bodies(rig: Rig, stranger: Client, body: bytes) -> None:
    ok_reply(await ask(stranger, ECHO, body))
    await assert_plugins_answer(stranger)


@SHARED
async def test_action_endpoint_answers_a_burst_of_garbage_and_good_requests(rig: Rig, stranger: Client) -> None:
    bodies = [b"{nope", b"[]", b'{"word": 5}', DEEP_ARRAYS[:20_000] + DEEP_ARRAYS[-20_000:], b'{"word": "ok"}'] * 40
    replies = await asyncio.gather(*(ask(stranger, ECHO, b) for b in bodies))
    codes = Counter((error_reply(r)["code"] if CODE_HEADER in (r.headers or {}) else ok_reply(r)["status"])
                    for r in replies)
    assert codes == {"bad_request": 120, "invalid_params": 40, "ok": 40}
    await assert_plugins_answer(stranger)


# -- B: the proposal subject ----------------------------------------------------------------------


def prop(**fields: Any) -> bytes:
    """A proposal document with fields replaced (None removes one), serialized as given."""
    doc: dict[str, Any] = {
        "event_id": "ev-1",
        "plugin": "demo",
        "actions": [{"plugin": "demo", "action": "echo", "params": {"word": "hi"}}],
    }
    for key, value in fields.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def act(**fields: Any) -> dict[str, Any]:
    return {"plugin": "demo", "action": "echo", "params": {"word": "hi"}, **fields}


def raw_prop(action_json: bytes = b'{"plugin": "demo", "action": "echo"}', **top: bytes) -> bytes:
    """A proposal spelled out as bytes, for content json.dumps cannot produce."""
    fields = {"event_id": b'"ev-1"', "plugin": b'"demo"', **top}
    body = b", ".join(b'"' + k.encode() + b'": ' + v for k, v in fields.items())
    return b"{" + body + b', "actions": [' + action_json + b"]}"


EXPIRED = Event.new("demo.tick", HOST, ttl=1).model_copy(update={"time": datetime(2020, 1, 1, tzinfo=UTC)}).to_doc()


ANY = None  # any value is fine
Expect = tuple[str | set[str], str | set[str], str | set[str] | None]

PROPOSAL_GARBAGE: list[Any] = [
    pytest.param(b'{"event_id": "e", "plugin": ', [(GATE, "refused", BAD_REQUEST)], id="malformed-json"),
    pytest.param(b'{"event_id": "\xff\xfe"}', [(GATE, "refused", BAD_REQUEST)], id="invalid-utf8"),
    pytest.param(b"\x00" * 64, [(GATE, "refused", BAD_REQUEST)], id="nul-bytes"),
    pytest.param(b"", [(GATE, "refused", BAD_REQUEST)], id="empty"),
    pytest.param(b"[]", [(GATE, "refused", INVALID)], id="array"),
    pytest.param(b'"proposal"', [(GATE, "refused", INVALID)], id="string"),
    pytest.param(b"3.14", [(GATE, "refused", INVALID)], id="number"),
    pytest.param(b"null", [(GATE, "refused", INVALID)], id="null"),
    pytest.param(prop(event_id=5), [(GATE, "refused", INVALID)], id="wrong-type-event-id"),
    pytest.param(prop(plugin=["demo"]), [(GATE, "refused", INVALID)], id="wrong-type-plugin"),
    pytest.param(prop(actions=act()), [(GATE, "refused", INVALID)], id="actions-not-a-list"),
    pytest.param(prop(actions=[act(params="word=hi")]), [(GATE, "refused", INVALID)], id="params-not-an-object"),
    pytest.param(prop(time=5), [(GATE, "refused", INVALID)], id="wrong-type-time"),
    pytest.param(prop(time="2020-13-45T99:99:99Z"), [(GATE, "refused", CLIENT_FAULT)], id="impossible-time"),
    pytest.param(prop(time="2020-01-01T00:00:00"), [(GATE, "refused", CLIENT_FAULT)], id="naive-time"),
    pytest.param(prop(event_id=None), [(GATE, "refused", INVALID)], id="missing-event-id"),
    pytest.param(prop(plugin=None), [(GATE, "refused", INVALID)], id="missing-plugin"),
    pytest.param(prop(actions=None), [(GATE, "refused", INVALID)], id="missing-actions"),
    pytest.param(prop(actions=[{"plugin": "demo"}]), [(GATE, "refused", INVALID)], id="action-missing-name"),
    pytest.param(prop(sudo=True), [(GATE, "refused", INVALID)], id="unknown-field"),
    pytest.param(prop(actions=[act(sudo=True)]), [(GATE, "refused", INVALID)], id="unknown-field-in-action"),
    pytest.param(prop(actions=[]), [(GATE, "refused", INVALID)], id="no-actions"),
    pytest.param(prop(actions=[act()] * 33), [(GATE, "refused", INVALID)], id="33-actions"),
    pytest.param(prop(plugin="Demo!"), [(GATE, "refused", INVALID)], id="plugin-name-not-a-token"),
    pytest.param(prop(actions=[act(action="echo.>")]), [(GATE, "refused", INVALID)], id="action-subject-wildcard"),
    pytest.param(prop(actions=[act(reason="x" * 2000)]), [(GATE, "refused", INVALID)], id="reason-too-long"),
    pytest.param(DEEP_ARRAYS, [(GATE, "refused", BAD_REQUEST)], id="100k-nested-arrays"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": ' + DEEP_ARRAYS + b"}}"),
                 [(GATE, "refused", BAD_REQUEST)], id="100k-nested-in-params"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": ' + MID_DEEP + b"}}"),
                 [({GATE, "demo.echo"}, "refused", CLIENT_FAULT)], id="500-nested-in-params"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "boom", "params": {"x": ' + MID_DEEP + b"}}"),
                 [({GATE, "demo.boom"}, {"refused", "error"}, ANY)], id="500-nested-in-unchecked-params"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": ' + BIG_INT + b"}}"),
                 [(GATE, "refused", BAD_REQUEST)], id="int-too-many-digits"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": NaN}}'),
                 [("demo.echo", "refused", INVALID)], id="nan-param"),
    pytest.param(raw_prop(event=b'{"id": "e", "type": "demo.tick", "host": "h", "time": "2020-01-01T00:00:00Z", '
                                b'"severity": "info", "ttl": Infinity}'),
                 [(GATE, "refused", CLIENT_FAULT)], id="infinite-ttl"),
    pytest.param(prop(actions=[act(params={"word": "x" * (300 * 1024)})]), [(GATE, "refused", {"payload_too_large"})],
                 id="oversized"),
    # lone surrogates: valid JSON syntax, but no Unicode string can carry them on
    pytest.param(raw_prop(plugin=SURROGATE), [(GATE, "refused", CLIENT_FAULT)], id="surrogate-plugin-name"),
    pytest.param(raw_prop(**{"\\udc00": b"1"}), [(GATE, "refused", CLIENT_FAULT)], id="surrogate-unknown-field"),
    pytest.param(raw_prop(plugin=b'"\xed\xa0\x80"'), [(GATE, "refused", CLIENT_FAULT)], id="surrogate-as-raw-bytes"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "reason": ' + SURROGATE + b"}"),
                 [(GATE, "refused", CLIENT_FAULT)], id="surrogate-reason"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": ' + SURROGATE + b"}}"),
                 [({GATE, "demo.echo"}, {"refused", "error"}, ANY)], id="surrogate-param-value"),
    pytest.param(raw_prop(b'{"plugin": "demo", "action": "echo", "params": {' + SURROGATE + b": 1}}"),
                 [({GATE, "demo.echo"}, "refused", CLIENT_FAULT)], id="surrogate-param-key"),
    # readable proposals the gate must refuse, each on the action's own result subject
    # on demo's subject, a body naming another plugin is impersonation, whatever it asks
    pytest.param(proposal("echo", plugin="ghost", owner="ghost"), [("ghost.echo", "refused", "impersonation")],
                 id="impersonating-an-unknown-plugin"),
    pytest.param(proposal("nope"), [("demo.nope", "refused", "unknown_action")], id="unknown-action"),
    pytest.param(proposal("echo", plugin="ticker", owner="demo"), [("demo.echo", "refused", "impersonation")],
                 id="impersonating-ticker"),
    pytest.param(proposal("note", {"text": "x"}, plugin="ticker", owner="ticker"),
                 [("ticker.note", "refused", "impersonation")], id="impersonating-ticker-for-its-action"),
    pytest.param(proposal("note", {"text": "x"}, owner="ticker"), [("ticker.note", "refused", "foreign_action")],
                 id="foreign-action"),
    pytest.param(proposal("echo", plugin="ghost", owner="demo"), [("demo.echo", "refused", "impersonation")],
                 id="impersonating-by-unknown-plugin"),
    pytest.param(proposal("reboot"), [("demo.reboot", "refused", "permission_not_granted")],
                 id="permission-not-granted"),
    pytest.param(proposal("echo", {"word": 5}), [("demo.echo", "refused", "invalid_params")], id="invalid-params"),
    pytest.param(proposal("echo", {"rm": "-rf /"}), [("demo.echo", "refused", "invalid_params")],
                 id="unknown-param"),
    pytest.param(prop(event=EXPIRED, event_id=EXPIRED["id"]), [("demo.echo", "expired", "event_expired")],
                 id="expired-event"),
    pytest.param(prop(actions=[act(), act(action="nope"), act(action="reboot"), act(plugin="ticker", action="note")]),
                 [("demo.echo", "ok", None), ("demo.nope", "refused", "unknown_action"),
                  ("demo.reboot", "refused", "permission_not_granted"), ("ticker.note", "refused", "foreign_action")],
                 id="one-good-three-bad-actions"),
]


def matches(value: Any, want: str | set[str] | None) -> bool:
    if want is None:
        return True
    return value in want if isinstance(want, set) else value == want


@SHARED
@pytest.mark.parametrize("handed", [False, True], ids=["stored", "handed"])
@pytest.mark.parametrize(("raw", "expected"), PROPOSAL_GARBAGE)
async def test_proposal_garbage_is_refused_on_the_record_while_good_traffic_flows(
    rig: Rig, stranger: Client, raw: bytes, expected: list[Expect], handed: bool
) -> None:
    assert len(raw) < stranger.max_payload
    echoes, notes, goods = rig.demo_calls.count("echo"), len(rig.ticker.notes), rig.good_sent
    records = await rig.submit(stranger, raw, len(expected), handed=handed)
    assert len(records) == len(expected), (
        f"{len(records)} records for {len(expected)} actions: {[r.brief for r in records]} "
        "(none: the gate failed on it and will redeliver it forever)"
    )
    for record, (where, status, reason) in zip(records, expected, strict=True):
        assert matches(record.where, where) and matches(record.doc["status"], status), record.brief
        assert matches(record.doc.get("reason"), reason), record.brief
        assert record.doc.get("host") == HOST, record.doc
        if record.doc["status"] != "ok":
            assert record.doc.get("reason") and record.doc.get("message"), record.doc
        if record.where == GATE:
            assert record.doc["error"]["code"] == record.doc["reason"], record.doc
    # nothing refused reached a plugin: only the good proposals' and the executed actions ran
    ran = sum(r.where == "demo.echo" and r.doc["status"] in ("ok", "error") for r in records)
    assert rig.demo_calls.count("echo") - echoes == rig.good_sent - goods + ran
    assert len(rig.ticker.notes) - notes == sum(r.where == "ticker.note" and r.doc["status"] == "ok" for r in records)
    assert not rig.records.invalid, rig.records.invalid[:5]


@SHARED
async def test_a_flood_of_one_proposal_executes_it_exactly_once(rig: Rig, stranger: Client) -> None:
    echoes = rig.demo_calls.count("echo")
    flood = proposal("echo", {"word": "flood"})
    flood_id = json.loads(flood)["id"]
    goods: list[str] = []
    for i in range(500):
        await stranger.publish(PROPOSALS, flood)
        if i % 20 == 0:
            good_id, good = rig.good_proposal()
            goods.append(good_id)
            await stranger.publish(PROPOSALS, good)
    await stranger.flush()

    def done() -> bool:
        return len(rig.records.of(flood_id)) >= 500 and all(rig.records.of(g) for g in goods)

    assert await until(done, 20), f"{len(rig.records.of(flood_id))} flood records"
    await asyncio.sleep(0.3)
    flood_records = rig.records.of(flood_id)
    statuses = Counter((r.doc["status"], r.doc.get("reason")) for r in flood_records)
    assert statuses == {("ok", None): 1, ("duplicate", "already_claimed"): 499}, statuses
    assert len({r.doc["id"] for r in flood_records}) == 1  # one action id
    assert [rig.records.of(g)[0].doc["status"] for g in goods] == ["ok"] * len(goods)
    assert rig.demo_calls.count("echo") - echoes == 1 + len(goods)  # the flood's echo ran once
    assert not rig.records.invalid, rig.records.invalid[:5]

    # The audit stream keeps one record per (action id, status): the duplicates fold into one.
    js = rig.nc.jetstream()
    sub = await js.subscribe(f"tuxpilot.result.{HOST}.demo.echo", ordered_consumer=True)
    stored: Counter[str] = Counter()
    with contextlib.suppress(NatsTimeout, TimeoutError):
        while True:
            doc = json.loads((await sub.next_msg(timeout=0.5)).data)
            if doc.get("proposal_id") == flood_id:
                stored[doc["status"]] += 1
    await sub.unsubscribe()
    assert stored == {"ok": 1, "duplicate": 1}, stored


@SHARED
async def test_a_flood_of_one_handed_over_proposal_runs_and_is_recorded_once(rig: Rig, stranger: Client) -> None:
    """300 copies of one proposal handed over at once: the gate decides the first, answers the others
    as decided (waiting for it), and neither runs nor records them again; a stored copy after them is
    acked as decided too."""
    echoes = rig.demo_calls.count("echo")
    flood = proposal("echo", {"word": "handed flood"})
    flood_id = json.loads(flood)["id"]
    answers = await asyncio.gather(*(stranger.request(HANDOFF, flood, timeout=10) for _ in range(300)))
    assert {json.dumps(json.loads(a.data), sort_keys=True) for a in answers} <= {'{"decided": 0}', '{"decided": 1}'}
    assert sum(json.loads(a.data)["decided"] for a in answers) == 1
    await stranger.publish(PROPOSALS, flood)
    good_id, good = rig.good_proposal()
    await stranger.publish(PROPOSALS, good)
    await stranger.flush()
    assert await until(lambda: bool(rig.records.of(good_id)), 10)
    await asyncio.sleep(0.3)
    assert [(r.doc["status"], r.doc.get("reason")) for r in rig.records.of(flood_id)] == [("ok", None)]
    assert rig.demo_calls.count("echo") - echoes == 2  # the flood's echo once, and the good one


# -- C: the events subject --------------------------------------------------------------------------


def event_doc(**fields: Any) -> dict[str, Any]:
    return {**Event.new("demo.tick", HOST).to_doc(), **fields}


EVENT_GARBAGE = [
    b'{"id": "unterminated',
    b"\xff\xfe\xfd",
    b"",
    b"\x00" * 32,
    b"[]",
    b"null",
    b'"demo.tick"',
    b"1e999",
    DEEP_ARRAYS,
    json.dumps(event_doc(data={"a": 0})).encode().replace(b'{"a": 0}', b'{"a": ' + MID_DEEP + b"}"),
    json.dumps({"id": "only-an-id"}).encode(),
    json.dumps(event_doc(id=5)).encode(),
    json.dumps(event_doc(id="no spaces allowed")).encode(),
    json.dumps(event_doc(severity="panic")).encode(),
    json.dumps(event_doc(time="yesterday")).encode(),
    json.dumps(event_doc(type="demo")).encode(),
    json.dumps(event_doc(sudo=True)).encode(),
    json.dumps(event_doc(data="not an object")).encode(),
    json.dumps(event_doc(value=float("nan"))).encode(),
    json.dumps(event_doc(data={"a": "\ud800"})).encode(),
    json.dumps(event_doc(type="other.thing")).encode(),  # valid, but no handler matches it
    b"x" * (900 * 1024),
]


@SHARED
async def test_event_garbage_does_not_kill_the_plugin_consumer(rig: Rig, stranger: Client) -> None:
    ticks, notes = len(rig.ticker.ticks), len(rig.ticker.notes)
    js = stranger.jetstream()
    for raw in EVENT_GARBAGE:
        await js.publish(TICK, raw)  # stored: each one reaches the plugins' durable consumers
    good = Event.new("demo.tick", HOST)
    await bus.publish_event(stranger, rig.gate.subjects, good)

    def noted() -> list[Record]:
        return [r for r in rig.records.seen if r.where == "ticker.note" and r.doc.get("event_id") == good.id]

    assert await until(lambda: bool(noted()), 10), "a good event after the garbage produced no proposal"
    assert noted()[0].doc["status"] == "ok" and noted()[0].doc["data"] == {"text": good.id}
    assert rig.ticker.ticks[ticks:] == [good.id]  # the handler saw no garbage
    assert rig.ticker.notes[notes:] == [good.id]

    # Garbage is terminated, not left pending or redelivered: both plugins' consumers are clear.
    async def clear(consumer: str) -> bool:
        info = await js.consumer_info("tuxpilot_events", consumer)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    for consumer in (f"ticker-{HOST}", f"demo-{HOST}"):
        deadline = time.monotonic() + 5
        while not await clear(consumer):
            assert time.monotonic() < deadline, await js.consumer_info("tuxpilot_events", consumer)
            await asyncio.sleep(0.05)

    # and the next good event still goes all the way through
    again = Event.new("demo.tick", HOST)
    await bus.publish_event(stranger, rig.gate.subjects, again)
    assert await until(lambda: again.id in rig.ticker.notes, 10)
    await assert_plugins_answer(stranger)


# -- D: fuzzing both --------------------------------------------------------------------------------

FUZZ_DOCS = 1000

texts = st.one_of(
    *[st.text(max_size=12)] * 9,
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),  # lone surrogates, now and then
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
param_values = st.one_of(st.text(max_size=24), json_values)
near_params = st.one_of(
    st.fixed_dictionaries({"word": st.text(max_size=24)}),
    st.fixed_dictionaries({"text": st.text(max_size=24)}),
    st.dictionaries(st.sampled_from(["word", "text", "x"]) | texts, param_values, max_size=3),
)

SPECIAL_ACTION_BODIES = [
    DEEP_ARRAYS,
    b'{"word": ' + MID_DEEP + b"}",
    b'{"word": ' + BIG_INT + b"}",
    b'{"word": "' + b"x" * (MAX_PARAMS_BYTES + 16) + b'"}',
    b'{"word": NaN}',
    b"{" + SURROGATE + b": 1}",
]


def serialize(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=False with surrogatepass writes lone surrogates as (invalid) UTF-8 bytes
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def action_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["bytes"] * 6 + ["json"] * 6 + ["near"] * 7 + ["special"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=256))
    if kind == "special":
        return kind, draw(st.sampled_from(SPECIAL_ACTION_BODIES))
    value = draw(json_values if kind == "json" else near_params)
    return kind, serialize(value, draw(st.booleans()))


def fuzz_event() -> dict[str, Any]:
    return Event.new("demo.tick", HOST).to_doc()


@st.composite
def near_proposals(draw: st.DrawFn) -> dict[str, Any]:
    plugin = draw(st.sampled_from(["demo", "demo", "demo", "ticker", "ghost"]))
    actions = []
    for _ in range(draw(st.integers(1, 3))):
        action: dict[str, Any] = {
            "plugin": draw(st.sampled_from([plugin, plugin, "demo", "ticker", "ghost"])),
            "action": draw(st.sampled_from(["echo", "echo", "note", "boom", "reboot", "prune", "nope"])),
            "params": draw(near_params),
        }
        if draw(st.booleans()):
            action["resource"] = draw(st.text(max_size=16))
        actions.append(action)
    doc: dict[str, Any] = {
        "event_id": draw(st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)),
        "plugin": plugin,
        "actions": actions,
    }
    if draw(st.booleans()):
        event = fuzz_event()
        ttl = draw(st.sampled_from([None, 0, 3600]))
        if ttl is not None:
            event["ttl"] = ttl
        doc["event"], doc["event_id"] = event, event["id"]
    mutation = draw(st.sampled_from(["none"] * 4 + ["set", "drop", "extra", "action-set", "action-drop"]))
    target = doc["actions"][0]
    if mutation == "set":
        doc[draw(st.sampled_from(["event_id", "plugin", "actions", "time", "event"]))] = draw(json_values)
    elif mutation == "drop":
        doc.pop(draw(st.sampled_from(["event_id", "plugin", "actions"])))
    elif mutation == "extra":
        doc[draw(texts)] = draw(json_values)
    elif mutation == "action-set":
        target[draw(st.sampled_from(["plugin", "action", "params", "reason", "resource"]))] = draw(json_values)
    elif mutation == "action-drop":
        target.pop(draw(st.sampled_from(["plugin", "action"])))
    return doc


SPECIAL_PROPOSALS = [
    DEEP_ARRAYS,
    raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": ' + MID_DEEP + b"}}"),
    raw_prop(b'{"plugin": "demo", "action": "echo", "params": {"word": ' + BIG_INT + b"}}"),
    prop(actions=[act(params={"word": "x" * (300 * 1024)})]),
    raw_prop(plugin=SURROGATE),
]


@st.composite
def proposal_bodies(draw: st.DrawFn) -> tuple[str, bytes | dict[str, Any]]:
    kind = draw(st.sampled_from(["bytes"] * 5 + ["json"] * 5 + ["near"] * 9 + ["special"]))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=256))
    if kind == "json":
        return kind, serialize(draw(json_values), draw(st.booleans()))
    if kind == "special":
        return kind, draw(st.sampled_from(SPECIAL_PROPOSALS))
    return kind, draw(near_proposals())  # serialized once its id is set


def collect(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """n documents drawn by hypothesis (generation only: the server work happens once, afterwards)."""
    found: list[Any] = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(doc: Any) -> None:
        found.append(doc)

    draw()
    return found


@dataclass
class FuzzReport:
    action_answers: dict[str, Counter[str]] = field(default_factory=dict)
    proposal_answers: dict[str, Counter[str]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def problem(self, kind: str, sample: str) -> None:
        self.problems.setdefault(kind, []).append(sample)

    def summary(self) -> str:
        lines = ["action endpoint:"]
        for k, c in self.action_answers.items():
            lines.append(f"  {k:8} {sum(c.values()):4} sent -> {dict(c.most_common())}")
        lines.append("proposal subject (records by status/reason):")
        for k, c in self.proposal_answers.items():
            answers = {a: n for a, n in c.most_common() if a != "#sent"}
            lines.append(f"  {k:8} {c.get('#sent', 0):4} sent -> {answers}")
        for kind, samples in self.problems.items():
            lines.append(f"PROBLEM x{len(samples)}: {kind}")
            lines += [f"    e.g. {x[:300]}" for x in samples[:2]]
        return "\n".join(lines)


def gist(message: str) -> str:
    """An error message without its particulars (quoted values, positions), to group alike ones."""
    message = re.sub(r"characters? ('.*?' )?in position [\d-]+", "…", message)
    return re.sub(r"\d+", "N", message)[:90]


def expected_records(raw: bytes, max_payload: int) -> tuple[str | None, int, str | None]:
    """(proposal id, records) the gate owes a proposal: one per action, or one refusal.

    The third item names an exception other than TuxPilotError that the gate's parse step raised.
    """
    try:
        parsed = parse_proposal(raw, max_payload)
    except TuxPilotError:
        return None, 1, None
    except Exception as exc:  # the gate must still answer: counted as one refusal
        return None, 1, f"{type(exc).__name__}: {gist(str(exc))}"
    return parsed.id, len(parsed.actions), None


async def throw_everything(url: str, state: Path, bodies: list[tuple[str, bytes]],
                           proposals: list[tuple[str, bytes | dict[str, Any]]]) -> FuzzReport:
    report = FuzzReport()
    config = host_config(url, state)
    nc = await nats.connect(url, name="rig")
    stranger = await nats.connect(url, name="stranger")
    try:
        async with running(nc, config) as rig:
            # The action endpoint: every request answered, every answer a schema-valid document.
            slots = asyncio.Semaphore(32)

            async def one(kind: str, body: bytes) -> None:
                async with slots:
                    try:
                        msg = await stranger.request(ECHO, body, timeout=3)
                    except (NatsTimeout, TimeoutError):
                        report.problem(f"action {kind}: no reply", repr(body[:100]))
                        label = "NO REPLY"
                    else:
                        label = answer_label(msg, kind, body, report)
                report.action_answers.setdefault(kind, Counter())[label] += 1

            await asyncio.gather(*(one(kind, body) for kind, body in bodies))

            # The proposal subject: every proposal owes records; good proposals keep going through.
            owed: dict[str, int] = {}
            kinds: dict[str, str] = {}
            sent: dict[str, bytes] = {}
            unreadable: Counter[str] = Counter()
            goods: list[str] = []
            for i, (kind, doc) in enumerate(proposals):
                if isinstance(doc, dict):
                    doc = serialize({**doc, "id": f"fz-{i}"}, True)
                pid, n, raised = expected_records(doc, config.gate.max_payload)
                report.proposal_answers.setdefault(kind, Counter())["#sent"] += 1
                if raised:
                    report.problem(f"proposal {kind}: parse_proposal raised {raised}", repr(doc[:200]))
                if pid is None:
                    unreadable[kind] += 1
                else:
                    owed[pid], kinds[pid], sent[pid] = owed.get(pid, 0) + n, kind, doc
                await stranger.publish(PROPOSALS, doc)
                if i % 100 == 0:
                    good_id, good = rig.good_proposal()
                    goods.append(good_id)
                    await stranger.publish(PROPOSALS, good)
            await stranger.flush()
            total = sum(owed.values()) + sum(unreadable.values()) + len(goods)
            await until(lambda: len(rig.records.seen) >= total, 30)
            await asyncio.sleep(0.5)

            by_pid: dict[str, list[Record]] = {}
            for r in rig.records.seen:
                by_pid.setdefault(str(r.doc.get("proposal_id")), []).append(r)
            for pid, n in owed.items():
                got = by_pid.get(pid, [])
                if len(got) != n:
                    report.problem(f"proposal {kinds[pid]}: records missing (the gate failed on it)",
                                   f"{len(got)} records for {n} actions: {sent[pid][:200]!r}")
                for r in got:
                    report.proposal_answers[kinds[pid]][f"{r.doc['status']}/{r.doc.get('reason')}"] += 1
            refusals = [r for r in rig.records.seen if r.where == GATE]
            unread = report.proposal_answers.setdefault("unreadable (of all kinds)", Counter())
            unread["#sent"] = sum(unreadable.values())
            for r in refusals:
                unread[f"{r.doc['status']}/{r.doc.get('reason')}"] += 1
            if len(refusals) != sum(unreadable.values()):
                report.problem(
                    "unreadable proposals without a refusal record (the gate failed on them)",
                    f"{len(refusals)} refusals for {sum(unreadable.values())} unreadable proposals {dict(unreadable)}",
                )
            for g in goods:
                if [r.doc["status"] for r in by_pid.get(g, [])] != ["ok"]:
                    report.problem("good proposal not ok", f"{g}: {[r.brief for r in by_pid.get(g, [])]}")
            for x in rig.records.invalid:
                report.problem("record not valid under result.json", x)

            # Both still alive at the end.
            await assert_plugins_answer(stranger)
            good_id, good = rig.good_proposal()
            await stranger.publish(PROPOSALS, good)
            assert await until(lambda: bool(rig.records.of(good_id)), 5), "the gate is dead after the fuzz run"
            assert rig.records.of(good_id)[0].doc["status"] == "ok"
    finally:
        await stranger.close()
        await nc.close()
    return report


def answer_label(msg: Msg, kind: str, body: bytes, report: FuzzReport) -> str:
    headers = msg.headers or {}
    if not msg.data:
        report.problem(f"action {kind}: empty reply", repr(body[:100]))
        return "EMPTY"
    try:
        doc = json.loads(msg.data)
    except ValueError:
        report.problem(f"action {kind}: reply not JSON", repr(msg.data[:100]))
        return "NOT JSON"
    if CODE_HEADER in headers:
        if not ERROR_SCHEMA.is_valid(doc) or headers[CODE_HEADER] != str(STATUS_CODES.get(doc["code"], 500)):
            report.problem(f"action {kind}: bad error reply", f"{msg.data[:200]!r} {headers}")
            return "BAD ERROR"
        if doc["code"] == "internal":
            what = f"action {kind}: internal error for the caller's input: {gist(doc['message'])}"
            report.problem(what, repr(body[:100]))
        return str(doc["code"])
    if not RESULT_SCHEMA.is_valid(doc):
        report.problem(f"action {kind}: bad result reply", repr(msg.data[:200]))
        return "BAD RESULT"
    return str(doc["status"])


def test_fuzz_action_endpoint_and_proposal_subject(tmp_path: Path) -> None:
    bodies = collect(action_bodies(), FUZZ_DOCS)
    proposals = collect(proposal_bodies(), FUZZ_DOCS)
    assert len(bodies) >= FUZZ_DOCS and len(proposals) >= FUZZ_DOCS
    server = NatsServer(tmp_path / "nats").start()
    try:
        # A loop of its own, leaving the module's shared loop alone.
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            report = runner.run(throw_everything(server.url, tmp_path / "state", bodies, proposals))
    finally:
        server.stop()
    print(report.summary())
    assert sum(sum(c.values()) for c in report.action_answers.values()) == len(bodies)
    assert not report.problems, report.summary()
