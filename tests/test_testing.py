"""tuxpilot.testing, as a plugin author uses it: handlers called in-process through the SDK's own steps,
and a real nats-server for the tests that want one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from tuxpilot.protocol.errors import BadRequest, ConfigError, Forbidden, InvalidParams, TuxPilotError
from tuxpilot.protocol.manifest import builtin_dir
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import proposal_id
from tuxpilot.sdk.plugin import Plugin
from tuxpilot.testing import (
    EmittingContext,
    acall_action,
    adeliver_event,
    call_action,
    deliver_event,
    load_plugin,
    make_event,
    nats_server,
)

from tests.conformance.conftest import IMPLEMENTATIONS, manifest_text


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> Plugin:
    """The conformance suite's Python plugin, loaded as the host would load it."""
    impl = next(i for i in IMPLEMENTATIONS if i.name == "python")
    folder = tmp_path_factory.mktemp("plugins") / "conformance"
    shutil.copytree(impl.folder, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "plugin.toml").write_text(manifest_text(impl))
    return load_plugin(folder)


def test_call_action_fills_defaults_and_returns_the_result_document(conformance: Plugin) -> None:
    assert call_action(conformance, "echo") == {"status": "ok", "data": {"text": "hello", "n": 1}}
    assert call_action(conformance, "echo", {"n": 4})["data"] == {"text": "hello", "n": 4}
    assert call_action(conformance, "echo", b"")["data"] == {"text": "hello", "n": 1}


def test_call_action_raises_what_the_caller_would_get_as_an_error(conformance: Plugin) -> None:
    with pytest.raises(InvalidParams) as invalid:
        call_action(conformance, "echo", {"n": "five"})
    assert invalid.value.to_doc()["details"]["errors"][0]["path"] == "/n"
    with pytest.raises(BadRequest):
        call_action(conformance, "echo", b"{nope")
    with pytest.raises(TuxPilotError) as failed:
        call_action(conformance, "fail", {"code": "not_found", "message": "gone"})
    assert (failed.value.code, failed.value.status, failed.value.message) == ("not_found", 404, "gone")
    with pytest.raises(ConfigError, match="no action 'nope'"):
        call_action(conformance, "nope")


def test_a_real_plugin_runs_in_process() -> None:
    sysmon = load_plugin(builtin_dir() / "sysmon")
    result = call_action(sysmon, "top_processes", {"n": 2, "by": "memory"})
    assert result["status"] == "ok" and len(result["data"]["processes"]) == 2
    proposal = deliver_event(sysmon, "memory.high", value=96.0, resource="/")
    assert proposal is not None and proposal.actions[0].plugin == "sysmon"


def test_deliver_event_returns_the_proposal_the_plugin_would_publish(conformance: Plugin) -> None:
    event = make_event("conformance.propose")
    proposal = deliver_event(conformance, event)
    assert proposal is not None
    assert (proposal.id, proposal.event_id, proposal.plugin) == (proposal_id(event.id, "conformance"), event.id,
                                                                 "conformance")
    assert [(a.action, a.params) for a in proposal.actions] == [("echo", {"text": event.id, "n": 1})]
    assert deliver_event(conformance, "conformance.quiet") is None


def test_deliver_event_raises_what_a_failing_handler_raises_and_refuses_unsubscribed_events(
    conformance: Plugin,
) -> None:
    event = make_event("conformance.flaky", data={"fail": 1})
    with pytest.raises(Exception, match="failing delivery 1"):
        deliver_event(conformance, event)
    again = deliver_event(conformance, event)  # the redelivery
    assert again is not None and again.actions[0].params["n"] == 2
    with pytest.raises(ConfigError, match="does not subscribe"):
        deliver_event(conformance, "memory.high")


async def test_the_async_forms_work_inside_an_event_loop(conformance: Plugin) -> None:
    assert (await acall_action(conformance, "count", {"key": "async"}))["data"] == {"runs": 1, "key": "async"}
    assert await adeliver_event(conformance, "conformance.propose") is not None


async def test_emit_is_recorded_and_checked_against_emits(conformance: Plugin) -> None:
    ctx = EmittingContext(plugin=conformance, host="test-host", log=None, config={})
    event = await ctx.emit("conformance.noticed", value=1.0)
    assert ctx.emitted == [event] and event.source == "conformance" and isinstance(event, Event)
    with pytest.raises(Forbidden):
        await ctx.emit("memory.high")


async def test_nats_server_is_a_real_server_with_jetstream_and_is_stopped_after() -> None:
    with nats_server() as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="probe", subjects=["probe.>"])
            assert (await js.publish("probe.one", b"x")).seq == 1
        finally:
            await nc.close()
    assert not server.running()


def test_the_fixture_in_a_plugin_authors_own_test_suite(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tuxpilot.testing"]\n')
    (tmp_path / "test_mine.py").write_text(
        "import asyncio, nats\n"
        "from tuxpilot.protocol.manifest import builtin_dir\n"
        "from tuxpilot.testing import call_action, load_plugin\n\n"
        "def test_server(tuxpilot_server):\n"
        "    async def ping():\n"
        "        nc = await nats.connect(tuxpilot_server.url)\n"
        "        await nc.flush()\n"
        "        await nc.close()\n"
        "    asyncio.run(ping())\n\n"
        "def test_action():\n"
        "    plugin = load_plugin(builtin_dir() / 'sysmon')\n"
        "    assert call_action(plugin, 'process_tree', {'max_depth': 1})['status'] == 'ok'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout, json.dumps(done.stdout[-500:])
