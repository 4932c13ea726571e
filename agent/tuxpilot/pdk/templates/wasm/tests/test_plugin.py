"""{{name}}'s guest (plugin.wasm, built by build.sh), called in-process through the wasm host and the SDK's own
steps (`tuxpilot.testing`), as the plugin process calls it."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuxpilot.protocol.errors import InvalidParams
from tuxpilot.testing import call_action, deliver_event, load_plugin

plugin = load_plugin(Path(__file__).resolve().parent.parent)


def test_hello_fills_the_default() -> None:
    assert call_action(plugin, "hello") == {"status": "ok", "data": {"text": "hello world"}}


def test_hello_greets_the_name_given() -> None:
    assert call_action(plugin, "hello", {"name": "ops"})["data"] == {"text": "hello ops"}


def test_hello_refuses_params_its_schema_does_not_allow() -> None:
    with pytest.raises(InvalidParams):
        call_action(plugin, "hello", {"name": 5})


def test_hello_fails_with_its_own_error_code() -> None:
    with pytest.raises(Exception, match="no one to greet") as caught:
        call_action(plugin, "hello", {"name": "nobody"})
    assert caught.value.to_doc()["code"] == "not_found"  # type: ignore[attr-defined]


def test_the_event_proposes_hello() -> None:
    proposal = deliver_event(plugin, "{{event}}", value=95.0, resource="web")
    assert proposal is not None
    assert [(a.action, a.params) for a in proposal.actions] == [("hello", {"name": "web"})]
