"""The AsyncAPI document is valid AsyncAPI 3.0 (against the official JSON Schema, shipped in
tests/vendor, no network) and says what the code does: its addresses come from the subject builders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from tuxpilot.protocol import asyncapi, schemas
from tuxpilot.protocol.names import Subjects

SPEC = Path(__file__).parent / "vendor" / "asyncapi" / "3.0.0.json"


def _offline(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)  # everything the spec needs is bundled in it; never fetch


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    spec = json.loads(SPEC.read_text())
    registry: Registry[Any] = Registry(retrieve=_offline).with_resource(spec["$id"], Resource.from_contents(spec))
    return jsonschema.Draft7Validator(spec, registry=registry)


def test_the_document_is_valid_asyncapi_3(validator: jsonschema.Draft7Validator) -> None:
    doc = asyncapi.document()
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message[:300]}" for e in errors[:5])


def test_the_validator_does_refuse_a_broken_document(validator: jsonschema.Draft7Validator) -> None:
    doc = asyncapi.document()
    doc["asyncapi"] = "2.6.0"
    doc["operations"]["serveAction"]["action"] = "consume"
    assert len(list(validator.iter_errors(doc))) >= 2


def test_addresses_come_from_the_subject_builders() -> None:
    doc = asyncapi.document("acme.tux")
    s = Subjects("acme.tux", "web-1")
    concrete = {
        "event": s.event("memory.high"),
        "proposal": s.proposal("sysmon"),
        "handoff": s.handoff("sysmon"),
        "exec": s.exec("sysmon", "top_processes"),
        "act": s.act("sysmon", "top_processes"),
        "result": s.result("sysmon", "top_processes"),
        "metrics": s.metrics(),
    }
    values = {"host": "web-1", "plugin": "sysmon", "action": "top_processes", "category": "memory", "name": "high"}
    for channel, subject in concrete.items():
        address = doc["channels"][channel]["address"]
        assert re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], address) == subject, channel
        # Every parameter in the address is declared, as AsyncAPI requires.
        assert set(re.findall(r"\{(\w+)\}", address)) == set(doc["channels"][channel].get("parameters", {}))


def test_every_shipped_schema_is_in_the_document_unchanged() -> None:
    found = asyncapi.document()["components"]["schemas"]
    for name in schemas.SCHEMA_NAMES:
        assert found[name]["schema"] == schemas.load(name)


def test_tuxpilot_schema_asyncapi_prints_it() -> None:
    # The real command in a process of its own: the CLI configures logging for its process, which an
    # in-process runner would leave pointing at its closed streams for the tests after it.
    done = subprocess.run([sys.executable, "-m", "tuxpilot.cli", "schema", "asyncapi"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(json.dumps(asyncapi.document()))
