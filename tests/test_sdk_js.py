"""The JavaScript SDK (sdk/js) as a real node process against a real nats-server: the wire behaviour
docs/protocol.md asks of every SDK, seen from outside the process, as the agent sees it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from tuxpilot.agent.config import load_config
from tuxpilot.agent.gate import Gate
from tuxpilot.agent.registry import Registry
from tuxpilot.bus import streams
from tuxpilot.bus.connect import publish_event
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import ACTION_ID_HEADER, Names, Subjects, plugin_consumer_name
from tuxpilot.runtimes import javascript
from tuxpilot.settings import StreamsConfig

from tests.conftest import need, tuxpilot_exe, until

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "plugins" / "jsdemo"
SDK = HERE.parent / "sdk" / "js"
HOST = "js-host"
SUBJECTS = Subjects("tuxpilot", HOST)
ERROR_HEADER, ERROR_CODE_HEADER = "Nats-Service-Error", "Nats-Service-Error-Code"
STREAMS = StreamsConfig(backoff_s=[0.3, 0.3, 0.3], max_deliver=4, ack_wait_s=5)


def need_sdk() -> None:
    need("node", shutil.which("node") is not None, "the JavaScript SDK runs on node")
    need("sdk/js dependencies", (SDK / "node_modules" / "@nats-io").is_dir(), "run `npm ci` in sdk/js")


class JsPlugin:
    """The jsdemo plugin as a node process, with its log lines."""

    def __init__(self, server: NatsServer, tmp: Path, extra: dict[str, str] | None = None):
        manifest = load_manifest(FOLDER)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "TUXPILOT_NATS_URL": server.url,
            "TUXPILOT_HOST_ID": HOST,
            "TUXPILOT_LOG_LEVEL": "debug",
            "TUXPILOT_STREAMS_BACKOFF_S": json.dumps(STREAMS.backoff_s),
            **javascript.environment(manifest),
            **(extra or {}),
        }
        self.log_path = tmp / "jsdemo.log"
        self.log_file = self.log_path.open("wb")
        argv = javascript.JavaScript().launch(FOLDER, manifest, {}, os.environ.get("PATH", "")).argv
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log_file.close()
        return code


Launch = Callable[..., Awaitable[JsPlugin]]


@pytest.fixture
async def launch(nats_server: NatsServer, nc: Client, tmp_path: Path) -> AsyncIterator[Launch]:
    """Starts jsdemo with extra launch variables (as the host adds them), once it has logged that it started."""
    need_sdk()
    js = nc.jetstream()
    # What the agent does before it starts a plugin: the streams, and the plugin's durable consumer.
    await streams.ensure_streams(js, SUBJECTS, STREAMS)
    await streams.create_plugin_consumer(js, load_manifest(FOLDER), SUBJECTS, STREAMS)
    started: list[JsPlugin] = []

    async def start(**extra: str) -> JsPlugin:
        proc = JsPlugin(nats_server, tmp_path, extra)
        started.append(proc)
        await until(lambda: any(x.get("event") == "plugin.started" for x in proc.lines()), 20, "plugin.started")
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
async def plugin(launch: Launch) -> JsPlugin:
    """jsdemo as a host starts it with `gate.handoff = false`: no handover timeout, every proposal stored."""
    return await launch()


async def call(nc: Client, action: str, body: bytes | str = b"", action_id: str | None = "a-1") -> Msg:
    headers = {ACTION_ID_HEADER: action_id} if action_id else None
    data = body.encode() if isinstance(body, str) else body
    return await nc.request(SUBJECTS.exec("jsdemo", action), data, timeout=5, headers=headers)


def body(msg: Msg) -> Any:
    return json.loads(msg.data)


async def test_discovery_names_the_plugin_and_its_private_endpoints(plugin: JsPlugin, nc: Client) -> None:
    info = json.loads((await nc.request("$SRV.INFO.jsdemo", b"", timeout=5)).data)
    assert info["name"] == "jsdemo" and info["version"] == "1.2.3"
    meta = info["metadata"]
    assert meta["tuxpilot"] == "plugin" and meta["host"] == HOST and meta["plugin"] == "jsdemo"
    assert meta["pid"] == str(plugin.proc.pid) and meta["user"] and meta["instance"]
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert set(endpoints) == {"echo", "count", "big", "attempts"}
    assert endpoints["echo"]["subject"] == "tuxpilot.exec.js-host.jsdemo.echo"
    assert endpoints["echo"]["queue_group"] == "jsdemo"
    ping = json.loads((await nc.request("$SRV.PING.jsdemo", b"", timeout=5)).data)
    assert ping["metadata"]["plugin"] == "jsdemo"


async def test_params_are_validated_and_defaults_filled(plugin: JsPlugin, nc: Client) -> None:
    ok = await call(nc, "echo", '{"text": "hi"}')
    assert not (ok.headers or {}).get(ERROR_CODE_HEADER)
    assert body(ok) == {"status": "ok", "data": {"text": "hi", "n": 3, "action_id": "a-1"}}

    bad = await call(nc, "echo", '{"text": 5}', action_id="a-2")
    assert bad.headers and bad.headers[ERROR_CODE_HEADER] == "400" and bad.headers[ERROR_HEADER]
    doc = body(bad)
    assert doc["code"] == "invalid_params" and doc["details"]["errors"][0]["path"] == "/text"

    extra = await call(nc, "echo", '{"text": "x", "nope": 1}', action_id="a-3")
    assert body(extra)["code"] == "invalid_params"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{nope", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b'"text"', "bad_request"),
        (b'{"text": "\\ud800"}', "bad_request"),  # a lone surrogate
        (b"\xff\xfe{}", "bad_request"),  # not UTF-8
        (b"[" * 100 + b"]" * 100, "bad_request"),  # deeper than 64 levels
        (b'{"text": "' + b"x" * 300_000 + b'"}', "payload_too_large"),
    ],
)
async def test_hostile_params_get_an_error_document_and_headers(
    plugin: JsPlugin, nc: Client, raw: bytes, code: str
) -> None:
    reply = await call(nc, "echo", raw, action_id=None)
    assert reply.data, "never an empty body"
    assert body(reply)["code"] == code
    assert reply.headers and reply.headers[ERROR_CODE_HEADER] in {"400", "413"}
    # …and the plugin lives on.
    assert body(await call(nc, "echo", '{"text": "still here"}', action_id=None))["status"] == "ok"


async def test_a_repeated_action_id_is_answered_from_the_first_run(plugin: JsPlugin, nc: Client) -> None:
    first, second = await asyncio.gather(call(nc, "count", action_id="same"), call(nc, "count", action_id="same"))
    assert body(first) == body(second) == {"status": "ok", "data": {"calls": 1}}
    assert body(await call(nc, "count", action_id="same"))["data"] == {"calls": 1}
    assert body(await call(nc, "count", action_id="other"))["data"] == {"calls": 2}
    assert any(x.get("event") == "action.replayed" for x in plugin.lines())


async def test_an_action_id_is_one_actions_only(plugin: JsPlugin, nc: Client) -> None:
    assert body(await call(nc, "count", action_id="taken"))["status"] == "ok"
    reused = await call(nc, "echo", '{"text": "x"}', action_id="taken")
    assert reused.headers and reused.headers[ERROR_CODE_HEADER] == "409"
    assert body(reused)["code"] == "conflict"


async def test_a_reply_too_large_for_the_server_is_an_error(plugin: JsPlugin, nc: Client) -> None:
    reply = await call(nc, "big")
    assert reply.headers and reply.headers[ERROR_CODE_HEADER] == "413"
    assert body(reply)["code"] == "payload_too_large"


async def test_a_handlers_error_is_an_error_reply_with_its_code(plugin: JsPlugin, nc: Client) -> None:
    reply = await call(nc, "attempts", '{"event_id": "none"}')
    assert reply.headers and reply.headers[ERROR_CODE_HEADER] == "404"
    assert body(reply) == {"code": "not_found", "message": "no attempts for none"}


async def proposals(nc: Client) -> list[dict[str, Any]]:
    js = nc.jetstream()
    info = await js.stream_info(Names.of(SUBJECTS).proposals)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(Names.of(SUBJECTS).proposals, seq)
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        found.append({"subject": msg.subject, "id": msg_id, **json.loads(msg.data or b"{}")})
    return found


async def consumer_idle(nc: Client) -> bool:
    ci = await nc.jetstream().consumer_info(Names.of(SUBJECTS).events, plugin_consumer_name("jsdemo", HOST))
    return ci.num_pending == 0 and ci.num_ack_pending == 0


class Handed:
    """Every proposal jsdemo hands over by request, as a bystander beside the gate sees it (a plain
    subscription, outside the gate's queue group: it gets a copy and never answers)."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []

    async def watch(self, nc: Client) -> Handed:
        async def seen(msg: Msg) -> None:
            self.msgs.append(msg)

        await nc.subscribe(SUBJECTS.handoff("jsdemo"), cb=seen)
        await nc.flush()
        return self

    def ids(self) -> list[str]:
        return [json.loads(m.data)["id"] for m in self.msgs]


@contextlib.asynccontextmanager
async def gate(nc: Client, server: NatsServer, tmp: Path) -> AsyncIterator[list[dict[str, Any]]]:
    """The host's real gate for jsdemo, yielding the audit records it publishes."""
    config = load_config(environ={"TUXPILOT_NATS_URL": server.url, "TUXPILOT_HOST_ID": HOST,
                                  "TUXPILOT_STATE_DIR": str(tmp / "gate-state")})
    config.streams = STREAMS
    records: list[dict[str, Any]] = []

    async def recorded(msg: Msg) -> None:
        records.append(json.loads(msg.data))

    sub = await nc.subscribe(SUBJECTS.results(HOST), cb=recorded)
    registry = Registry(nc, SUBJECTS, {"jsdemo": load_manifest(FOLDER)})
    await registry.start()
    the_gate = Gate(nc, config, registry)
    await the_gate.start()
    try:
        yield records
    finally:
        await the_gate.stop()
        await registry.stop()
        await sub.unsubscribe()


async def settle(nc: Client, done: Callable[[], bool] = lambda: True) -> None:
    """Until jsdemo acked every event and `done()` holds."""
    for _ in range(150):
        if done() and await consumer_idle(nc):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("jsdemo did not settle")


def proposal_for(event: Event) -> dict[str, Any]:
    return {
        "id": f"{event.id}-jsdemo", "event_id": event.id, "plugin": "jsdemo",
        "actions": [{"plugin": "jsdemo", "action": "echo", "params": {"text": f"seen {event.id}"},
                     "reason": "demo", "resource": "/srv"}],
    }


def decided(records: list[dict[str, Any]], event: Event) -> list[dict[str, Any]]:
    return [r for r in records if r.get("proposal_id") == f"{event.id}-jsdemo"]


async def test_an_event_becomes_one_proposal_even_when_delivered_twice(plugin: JsPlugin, nc: Client) -> None:
    # No handover timeout (the host's `gate.handoff = false`): stored, even with a gate listening.
    handed = await Handed().watch(nc)
    event = Event.new("demo.propose", HOST, resource="/srv")
    await publish_event(nc, SUBJECTS, event)
    # The same event stored again (as a redelivery would bring it): the same proposal id, stored once.
    await nc.jetstream().publish(SUBJECTS.event(event.type), event.to_json(), headers={"Nats-Msg-Id": "again"})
    found: list[dict[str, Any]] = []

    async def settled() -> bool:
        found[:] = await proposals(nc)
        return bool(found) and await consumer_idle(nc)

    for _ in range(100):
        if await settled():
            break
        await asyncio.sleep(0.1)
    assert len(found) == 1, found
    proposal = found[0]
    assert proposal["subject"] == f"tuxpilot.proposal.{HOST}.jsdemo"
    assert proposal["id"] == f"{event.id}-jsdemo"
    assert {k: proposal[k] for k in proposal_for(event)} == proposal_for(event)
    assert proposal["event"]["id"] == event.id
    assert not handed.msgs


async def test_with_a_handover_timeout_a_proposal_goes_to_the_gate_by_request_and_is_not_stored(
    launch: Launch, nc: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    handed = await Handed().watch(nc)
    async with gate(nc, nats_server, tmp_path) as records:
        plugin = await launch(TUXPILOT_HANDOFF_TIMEOUT_S="3")
        event = Event.new("demo.propose", HOST, resource="/srv")
        await publish_event(nc, SUBJECTS, event)
        await settle(nc, lambda: bool(decided(records, event)))
        # Redelivered (stored again under another message id): handed over again, decided once.
        await nc.jetstream().publish(SUBJECTS.event(event.type), event.to_json(), headers={"Nats-Msg-Id": "again"})
        await settle(nc, lambda: len(handed.msgs) == 2)
        await asyncio.sleep(0.3)  # a second decision would show up now
    assert handed.ids() == [f"{event.id}-jsdemo"] * 2
    msg = handed.msgs[0]
    assert msg.subject == f"tuxpilot.propose.{HOST}.jsdemo"
    assert (msg.headers or {}).get("Nats-Msg-Id") == f"{event.id}-jsdemo"
    doc = json.loads(msg.data)
    assert {k: doc[k] for k in proposal_for(event)} == proposal_for(event) and doc["event"]["id"] == event.id
    [record] = decided(records, event)
    assert record["plugin"] == "jsdemo" and record["action"] == "echo" and record["status"] == "ok", record
    assert not await proposals(nc), "decided by request: nothing stored"
    said = [x for x in plugin.lines() if x.get("event") == "plugin.proposed"]
    assert [x["handed"] for x in said] == [True, True]


async def test_with_no_gate_the_proposal_is_stored_and_none_handed_over_for_five_seconds(
    launch: Launch, nc: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    plugin = await launch(TUXPILOT_HANDOFF_TIMEOUT_S="3")
    first = Event.new("demo.propose", HOST, resource="/srv")
    asked_at = asyncio.get_running_loop().time()
    await publish_event(nc, SUBJECTS, first)  # nobody subscribes the handover subject: no responders, stored
    await settle(nc)
    assert [p["id"] for p in await proposals(nc)] == [f"{first.id}-jsdemo"]
    handed = await Handed().watch(nc)
    async with gate(nc, nats_server, tmp_path) as records:
        second = Event.new("demo.propose", HOST, resource="/srv")
        await publish_event(nc, SUBJECTS, second)  # a gate is back, but the plugin does not ask yet: stored
        await settle(nc, lambda: bool(decided(records, second)))
        assert asyncio.get_running_loop().time() - asked_at < 5, "too slow to see the pause"
        assert [p["id"] for p in await proposals(nc)] == [f"{first.id}-jsdemo", f"{second.id}-jsdemo"]
        await asyncio.sleep(max(0.0, asked_at + 5.2 - asyncio.get_running_loop().time()))
        third = Event.new("demo.propose", HOST, resource="/srv")
        await publish_event(nc, SUBJECTS, third)  # the pause is over: handed over
        await settle(nc, lambda: bool(decided(records, third)))
    assert handed.ids() == [f"{third.id}-jsdemo"]
    assert len(await proposals(nc)) == 2
    said = [x for x in plugin.lines() if x.get("event") == "plugin.proposed"]
    assert [x["handed"] for x in said] == [False, False, True]
    assert not [x for x in plugin.lines() if x.get("event") == "plugin.handoff_unanswered"], "no responders: no wait"


async def test_a_gate_that_says_retry_gets_the_proposal_stored_and_is_asked_again(
    launch: Launch, nc: Client
) -> None:
    asked: list[Msg] = []

    async def busy(msg: Msg) -> None:
        asked.append(msg)
        await msg.respond(b'{"retry": "busy"}' if len(asked) == 1 else b"not json")

    await nc.subscribe(SUBJECTS.handoff("jsdemo"), queue=f"tuxpilot-gate-{HOST}", cb=busy)
    await launch(TUXPILOT_HANDOFF_TIMEOUT_S="3")
    events = [Event.new("demo.propose", HOST, resource="/srv") for _ in range(2)]
    for event in events:
        await publish_event(nc, SUBJECTS, event)
        await settle(nc)
    # Each answered, neither decided: both stored, and the second asked at once (an answer is no pause).
    assert len(asked) == 2
    assert [p["id"] for p in await proposals(nc)] == [f"{e.id}-jsdemo" for e in events]


async def test_a_gate_that_does_not_answer_in_time_gets_the_proposal_stored_and_logged(
    launch: Launch, nc: Client
) -> None:
    asked: list[Msg] = []

    async def silent(msg: Msg) -> None:  # takes the request, never answers (a slow decision)
        asked.append(msg)

    await nc.subscribe(SUBJECTS.handoff("jsdemo"), queue=f"tuxpilot-gate-{HOST}", cb=silent)
    plugin = await launch(TUXPILOT_HANDOFF_TIMEOUT_S="0.5")
    events = [Event.new("demo.propose", HOST, resource="/srv") for _ in range(2)]
    for event in events:
        await publish_event(nc, SUBJECTS, event)
        await settle(nc)
    assert len(asked) == 1, "paused after the timeout: the second is stored without asking"
    assert [p["id"] for p in await proposals(nc)] == [f"{e.id}-jsdemo" for e in events]
    [warned] = [x for x in plugin.lines() if x.get("event") == "plugin.handoff_unanswered"]
    assert warned["level"] == "warning" and warned["timeout_s"] == 0.5 and warned["paused_s"] == 5


async def test_a_failing_handler_is_naked_with_the_backoff_until_max_deliver(plugin: JsPlugin, nc: Client) -> None:
    event = Event.new("demo.fail", HOST)
    await publish_event(nc, SUBJECTS, event)
    seen: dict[str, Any] = {}

    async def tried() -> None:
        reply = body(await call(nc, "attempts", json.dumps({"event_id": event.id}), action_id=None))
        seen.update(reply.get("data") or {})

    for _ in range(100):
        await tried()
        if seen.get("attempts") == STREAMS.max_deliver:
            break
        await asyncio.sleep(0.1)
    assert seen.get("attempts") == STREAMS.max_deliver
    failed = [x for x in plugin.lines() if x.get("event") == "plugin.event_failed"]
    assert [x["retry_in_s"] for x in failed] == [0.3] * STREAMS.max_deliver
    assert "this handler always fails" in failed[0]["exception"]
    assert not await proposals(nc)


async def test_garbage_is_terminated_not_redelivered(plugin: JsPlugin, nc: Client) -> None:
    js = nc.jetstream()
    extra_field = json.dumps({**Event.new("demo.quiet", HOST).to_doc(), "x": 1}).encode()
    for garbage in (b"not json", b"[]", b'{"id": "x"}', extra_field):
        await js.publish(SUBJECTS.event("demo.quiet"), garbage)
    await publish_event(nc, SUBJECTS, Event.new("demo.quiet", HOST))  # and one real event, handled
    for _ in range(100):
        if await consumer_idle(nc):
            break
        await asyncio.sleep(0.1)
    ci = await js.consumer_info(Names.of(SUBJECTS).events, plugin_consumer_name("jsdemo", HOST))
    assert ci.num_ack_pending == 0 and ci.num_redelivered == 0
    assert len([x for x in plugin.lines() if x.get("event") == "plugin.bad_event"]) == 4


async def test_sigterm_stops_it_cleanly_with_json_log_lines(plugin: JsPlugin, nc: Client) -> None:
    assert body(await call(nc, "echo", '{"text": "bye"}'))["status"] == "ok"
    assert plugin.stop() == 0
    lines = plugin.log_path.read_text().splitlines()
    assert lines and all(json.loads(line)["level"] in {"debug", "info", "warning", "error"} for line in lines)
    logged = [json.loads(line) for line in lines]
    echo = next(x for x in logged if x["event"] == "echoing")
    assert echo["plugin"] == "jsdemo" and echo["host"] == HOST and echo["action_id"] == "a-1" and echo["text"] == "bye"
    assert logged[-1]["event"] == "plugin.stopped"
    # The service is gone: nobody answers discovery for it any more.
    with pytest.raises(Exception, match=r"no responders|timeout"):
        await nc.request("$SRV.PING.jsdemo", b"", timeout=1)


async def test_plugin_run_runs_a_javascript_plugin(nats_server: NatsServer, nc: Client, tmp_path: Path) -> None:
    need_sdk()
    env = {**os.environ, "TUXPILOT_NATS_URL": nats_server.url, "TUXPILOT_HOST_ID": HOST,
           "TUXPILOT_STATE_DIR": str(tmp_path / "state"), "TUXPILOT_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    proc = await asyncio.create_subprocess_exec(
        tuxpilot_exe(), "plugin", "run", str(FOLDER), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        reply: Msg | None = None
        for _ in range(100):
            with contextlib.suppress(Exception):
                reply = await call(nc, "echo", '{"text": "by hand"}', action_id=None)
                break
            await asyncio.sleep(0.2)
        assert reply is not None and body(reply)["data"]["text"] == "by hand"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"jsdemo 1.2.3 (javascript)" in err and b'"event":"plugin.stopped"' in err
