"""Serving actions on the exec subject: params validation and defaults, error replies (JSON body and
micro headers), replay by action id, and replies too large to send."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.aio.msg import Msg
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import PLUGIN_STATUS_CODES

from tests.conformance.conftest import Bus, Implementation

pytestmark = pytest.mark.slow

ERROR_HEADER, ERROR_CODE_HEADER = "Nats-Service-Error", "Nats-Service-Error-Code"


def ok(msg: Msg) -> Any:
    """The data of a successful reply, which carries no error headers."""
    assert not (msg.headers or {}).get(ERROR_CODE_HEADER), msg.data
    doc = json.loads(msg.data)
    schemas.validator("result").check(doc)
    assert doc["status"] == "ok"
    return doc.get("data")


def error(msg: Msg, code: str, number: int) -> dict[str, Any]:
    """An error reply: an `error` document in the body and the same code and message in the headers."""
    assert msg.data, "a reply is never empty"
    doc = json.loads(msg.data)
    schemas.validator("error").check(doc)
    assert doc["code"] == code, doc
    headers = msg.headers or {}
    assert headers.get(ERROR_CODE_HEADER) == str(number), headers
    description = headers.get(ERROR_HEADER, "")
    assert description and "\n" not in description and "\r" not in description and len(description) <= 1000
    return doc


async def test_defaults_are_filled_in_and_an_empty_body_means_no_params(bus: Bus) -> None:
    assert ok(await bus.request("echo", b"")) == {"text": "hello", "n": 1}
    assert ok(await bus.request("echo", {})) == {"text": "hello", "n": 1}
    assert ok(await bus.request("echo", {"n": 3})) == {"text": "hello", "n": 3}
    assert ok(await bus.request("echo", {"text": "hi", "n": 0})) == {"text": "hi", "n": 0}


@pytest.mark.parametrize(
    ("body", "path"),
    [({"n": "five"}, "/n"), ({"n": 11}, "/n"), ({"text": "x" * 201}, "/text"), ({"extra": 1}, "/")],
)
async def test_params_that_fail_the_schema_are_invalid_params(bus: Bus, body: dict[str, Any], path: str) -> None:
    doc = error(await bus.request("echo", body), "invalid_params", 400)
    assert any(e["path"] == path for e in doc["details"]["errors"]), doc


@pytest.mark.parametrize("body", [b"{nope", b"[1, 2]", b'"text"', b"\xff\xfe"])
async def test_a_body_that_is_not_a_json_object_is_a_bad_request(bus: Bus, body: bytes) -> None:
    error(await bus.request("echo", body), "bad_request", 400)


async def test_params_above_256_kib_are_payload_too_large(bus: Bus) -> None:
    error(await bus.request("echo", {"text": "x" * (300 * 1024)}), "payload_too_large", 413)


@pytest.mark.parametrize("code", sorted(PLUGIN_STATUS_CODES))
async def test_a_handlers_error_keeps_its_code_and_number(bus: Bus, code: str) -> None:
    doc = error(await bus.request("fail", {"code": code, "message": f"failing with {code}"}), code,
                PLUGIN_STATUS_CODES[code])
    assert doc["message"] == f"failing with {code}"


async def test_a_plugins_own_error_code_is_sent_as_500(bus: Bus) -> None:
    error(await bus.request("fail", {"code": "disk_on_fire"}), "disk_on_fire", 500)


async def test_an_unexpected_failure_has_the_implementations_code(bus: Bus, request: pytest.FixtureRequest) -> None:
    impl: Implementation = request.node.callspec.params["implementation"]
    error(await bus.request("crash"), *impl.crash_error)
    assert ok(await bus.request("echo")) == {"text": "hello", "n": 1}  # and the plugin lives on


async def test_a_repeated_action_id_gets_the_first_reply_and_the_handler_runs_once(bus: Bus) -> None:
    first = await bus.request("count", {"key": "replay"}, action_id="replay-1")
    again = await bus.request("count", {"key": "replay"}, action_id="replay-1")
    assert ok(first) == {"runs": 1, "key": "replay"}
    assert again.data == first.data
    # A new id runs it again: the count shows the replay did not.
    assert ok(await bus.request("count", {"key": "replay"}, action_id="replay-2")) == {"runs": 2, "key": "replay"}


async def test_requests_racing_with_one_action_id_share_one_run(bus: Bus) -> None:
    replies = await asyncio.gather(
        *(bus.request("count", {"key": "race"}, action_id="race-1") for _ in range(5))
    )
    assert {r.data for r in replies} == {replies[0].data}
    assert ok(await bus.request("count", {"key": "race"}, action_id="race-2"))["runs"] == 2


async def test_an_error_reply_is_replayed_too(bus: Bus) -> None:
    first = await bus.request("fail", {"code": "conflict"}, action_id="failed-1")
    again = await bus.request("fail", {"code": "conflict"}, action_id="failed-1")
    error(first, "conflict", 409)
    assert again.data == first.data and (again.headers or {}).get(ERROR_CODE_HEADER) == "409"


async def test_an_action_id_reused_for_another_action_is_refused(bus: Bus) -> None:
    counted = await bus.request("count", {"key": "secret-of-count"}, action_id="reused-1")
    assert ok(counted)["runs"] == 1
    refused = await bus.request("echo", {"text": "other"}, action_id="reused-1")
    error(refused, "conflict", 409)
    assert b"secret-of-count" not in refused.data  # the first action's reply is never handed out
    # Neither did the reuse run the first action again.
    assert ok(await bus.request("count", {"key": "secret-of-count"}, action_id="reused-2"))["runs"] == 2


async def test_a_reply_larger_than_the_server_takes_is_payload_too_large(bus: Bus) -> None:
    assert len(ok(await bus.request("big", {"bytes": 1000}))["blob"]) == 1000
    too_big = bus.gate.max_payload + 1
    error(await bus.request("big", {"bytes": too_big}), "payload_too_large", 413)
