"""The pydantic models and the JSON Schemas agree: same fixtures through both, and generated instances."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from tuxpilot.protocol import schemas
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.models import GATE_STATUSES, ErrorDoc, Event, Metrics, Proposal, Reason, Result, Source, Status

MODELS: dict[str, type[BaseModel]] = {
    "event": Event,
    "proposal": Proposal,
    "result": Result,
    "error": ErrorDoc,
    "metrics": Metrics,
    "manifest": Manifest,
}

EVENT = {
    "id": "e1",
    "type": "memory.high",
    "host": "web-1",
    "time": "2026-11-25T10:00:00Z",
    "severity": "warning",
    "value": 93.5,
    "threshold": 90,
    "unit": "%",
    "ttl": 300,
    "data": {"total": 1},
}
USAGE = {"total": 100, "used": 50, "available": 50, "percent": 50.0}

VALID: list[tuple[str, dict[str, Any]]] = [
    ("event", EVENT),
    ("event", {"id": "x", "type": "disk.low", "host": "h", "time": "2026-11-25T10:00:00+02:00", "severity": "info"}),
    (
        "proposal",
        {"event_id": "e1", "plugin": "sysmon", "actions": [{"plugin": "sysmon", "action": "top_processes"}]},
    ),
    (
        "proposal",
        {
            "id": "p1",
            "event_id": "e1",
            "plugin": "sysmon",
            "event": EVENT,
            "actions": [{"plugin": "sysmon", "action": "a", "params": {"n": 1}, "reason": "r", "resource": "/"}],
        },
    ),
    ("result", {"status": "ok"}),
    ("result", {"status": "ok", "data": [1, 2], "message": "m", "artifacts": [{"name": "a", "content": "x"}]}),
    ("result", {"status": "error", "reason": "timeout", "error": {"code": "timeout", "message": "slow"}}),
    ("error", {"code": "bad_request", "message": "no", "details": {"path": "/"}}),
    (
        "metrics",
        {
            "host": "h",
            "time": "2026-11-25T10:00:00Z",
            "cpu_percent": 3.5,
            "load": [0.1, 0.2, 0.3],
            "memory": USAGE,
            "swap": USAGE,
            "disks": [{"mountpoint": "/", "total": 10, "used": 5, "percent": 50}],
        },
    ),
    (
        "manifest",
        {
            "name": "demo",
            "version": "1.2.3",
            "description": "d",
            "category": "custom",
            "runtime": "python",
            "entry_point": "plugin.py",
            "api_version": "1",
            "permissions": ["filesystem_read"],
            "subscribes": ["disk.*"],
            "actions": {"go": {"permission": "filesystem_read", "params": {"type": "object"}}},
        },
    ),
]

INVALID: list[tuple[str, dict[str, Any]]] = [
    ("event", {**EVENT, "type": "memoryhigh"}),
    ("event", {**EVENT, "host": "Web 1"}),
    ("event", {**EVENT, "severity": "fatal"}),
    ("event", {**EVENT, "extra": 1}),
    ("event", {k: v for k, v in EVENT.items() if k != "time"}),
    ("event", {**EVENT, "ttl": -1}),
    ("event", {**EVENT, "value": "high"}),
    ("event", {**EVENT, "time": "2026-11-25T10:00:00"}),
    ("proposal", {"event_id": "e1", "plugin": "sysmon", "actions": []}),
    ("proposal", {"event_id": "e1", "plugin": "sysmon", "actions": [{"plugin": "sysmon"}]}),
    ("proposal", {"event_id": "e 1", "plugin": "sysmon", "actions": [{"plugin": "s", "action": "a"}]}),
    ("proposal", {"event_id": "e1", "plugin": "s", "actions": [{"plugin": "s", "action": "a", "params": []}]}),
    ("result", {"status": "maybe"}),
    ("result", {"status": "ok", "reason": "Not A Code"}),
    ("result", {"status": "ok", "unknown": True}),
    ("error", {"code": "x"}),
    ("error", {"code": "Bad Code", "message": "m"}),
    ("metrics", {"host": "h", "time": "2026-11-25T10:00:00Z", "cpu_percent": 101, "load": [0, 0, 0],
                 "memory": USAGE, "swap": USAGE, "disks": []}),
    ("metrics", {"host": "h", "time": "2026-11-25T10:00:00Z", "cpu_percent": 1, "load": [0, 0],
                 "memory": USAGE, "swap": USAGE, "disks": []}),
    ("manifest", {"name": "demo", "version": "1.2", "description": "d", "category": "custom",
                  "runtime": "python", "entry_point": "p.py", "api_version": "1"}),
    ("manifest", {"name": "demo", "version": "1.2.0", "description": "d", "category": "games",
                  "runtime": "python", "entry_point": "p.py", "api_version": "1"}),
    ("manifest", {"name": "demo", "version": "1.2.0", "description": "d", "category": "custom",
                  "runtime": "python", "entry_point": "p.py", "api_version": "1", "permissions": ["root"]}),
]


def model_accepts(name: str, doc: dict[str, Any]) -> bool:
    model = MODELS[name]
    try:
        if model is Manifest:
            Manifest.model_validate(doc)
        else:
            model.model_validate(doc)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(("name", "doc"), VALID)
def test_valid_fixture_passes_schema_and_model(name: str, doc: dict[str, Any]) -> None:
    assert schemas.validator(name).errors(doc) == []
    assert model_accepts(name, doc)


@pytest.mark.parametrize(("name", "doc"), INVALID)
def test_invalid_fixture_fails_schema_and_model(name: str, doc: dict[str, Any]) -> None:
    assert schemas.validator(name).errors(doc), "schema accepted it"
    assert not model_accepts(name, doc), "model accepted it"


@pytest.mark.parametrize(("name", "doc"), VALID)
def test_model_round_trip_stays_schema_valid(name: str, doc: dict[str, Any]) -> None:
    model = MODELS[name].model_validate(doc)
    dumped = model.model_dump(mode="json", exclude_none=True)
    assert schemas.validator(name).errors(dumped) == []


def test_every_schema_has_an_id_and_draft_2020_12() -> None:
    for name in schemas.SCHEMA_NAMES:
        doc = schemas.load(name)
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert doc["$id"].endswith(f"/{name}.json")


def test_schemas_are_valid_under_the_metaschema() -> None:
    import jsonschema

    for name in schemas.SCHEMA_NAMES:
        jsonschema.Draft202012Validator.check_schema(schemas.load(name))


# -- generated instances -------------------------------------------------------------------------

token = st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True)
ident = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
text = st.text(max_size=40)
json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | text
json_value = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8
)
json_object = st.dictionaries(text, json_value, max_size=4)

events = st.builds(
    Event,
    id=ident,
    time=st.datetimes(timezones=st.just(UTC)),
    type=st.builds(lambda a, b: f"{a}.{b}", token, token),
    host=token,
    severity=st.sampled_from(["info", "warning", "critical"]),
    source=st.none() | token,
    value=st.none() | finite,
    threshold=st.none() | finite,
    unit=st.none() | st.text(max_size=32),
    resource=st.none() | st.text(max_size=100),
    ttl=st.none() | st.floats(min_value=0, max_value=1e9),
    data=json_object,
)
actions = st.fixed_dictionaries(
    {"plugin": token, "action": token},
    optional={"params": json_object, "reason": st.text(max_size=100), "resource": st.none() | st.text(max_size=50)},
)
proposals = st.builds(
    lambda eid, plugin, acts, event: Proposal.model_validate(
        {"event_id": eid, "plugin": plugin, "actions": acts, **({"event": event.to_doc()} if event else {})}
    ),
    ident,
    token,
    st.lists(actions, min_size=1, max_size=4),
    st.none() | events,
)
results = st.builds(
    Result,
    id=st.none() | ident,
    status=st.sampled_from(["ok", "error", "refused", "suppressed", "dry_run", "timeout", "unavailable", "expired"]),
    reason=st.none() | st.sampled_from(list(Reason)),
    message=st.none() | st.text(max_size=200),
    data=json_value,
    host=st.none() | token,
    plugin=st.none() | token,
    action=st.none() | token,
    params=st.none() | json_object,
    duration_ms=st.none() | st.floats(min_value=0, max_value=1e6),
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_generated_events_are_schema_valid(event: Event) -> None:
    assert schemas.validator("event").errors(event.to_doc()) == []


@settings(max_examples=200, deadline=None)
@given(proposals)
def test_generated_proposals_are_schema_valid(proposal: Proposal) -> None:
    assert schemas.validator("proposal").errors(proposal.to_doc()) == []


@settings(max_examples=200, deadline=None)
@given(results)
def test_generated_results_are_schema_valid(result: Result) -> None:
    assert schemas.validator("result").errors(result.to_doc()) == []


def test_status_and_reason_enums_are_what_the_result_schema_lists() -> None:
    doc = schemas.load("result")
    assert [s.value for s in Status] == doc["$defs"]["status"]["enum"]
    assert [r.value for r in Reason] == doc["$defs"]["reason"]["enum"]
    assert sorted(GATE_STATUSES) == sorted(doc["allOf"][0]["if"]["properties"]["status"]["enum"])
    assert [s.value for s in Source] == doc["properties"]["source"]["enum"]


@pytest.mark.parametrize(
    ("doc", "valid"),
    [
        ({"status": "refused", "reason": "impersonation"}, True),
        ({"status": "refused", "reason": "made_up"}, False),  # the gate's reasons are a closed list
        ({"status": "error", "reason": "registry_error"}, True),  # a plugin's own error code
        ({"status": "ok"}, True),
    ],
)
def test_model_and_schema_agree_on_reasons(doc: dict[str, Any], valid: bool) -> None:
    assert schemas.validator("result").is_valid(doc) is valid
    try:
        Result.model_validate(doc)
        modelled = True
    except ValidationError:
        modelled = False
    assert modelled is valid
