"""The command helper: argv only, the manifest's allow-list, a timeout that kills the process group,
capped output, and system_access — directly and through a real plugin action over NATS."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import structlog
from nats.aio.client import Client
from tuxpilot.agent.config import Config
from tuxpilot.protocol.errors import Forbidden, TuxPilotError
from tuxpilot.sdk.command import locate, run_command
from tuxpilot.sdk.plugin import Context, Plugin, load_plugin

SHELL = Path(__file__).resolve().parent / "plugins" / "shell"
METACHARACTERS = ["; touch {x}", "$(touch {x})", "`touch {x}`", "&& touch {x}", "| touch {x}", "> {x}", "*", "'\""]


async def test_a_program_not_on_the_allow_list_is_refused() -> None:
    with pytest.raises(Forbidden, match="not in the manifest's `commands`") as refused:
        await run_command(["id"], allowed=["echo"])
    assert refused.value.code == "forbidden"
    with pytest.raises(Forbidden, match="not found"):
        await run_command(["./echo", "hi"], allowed=["echo"])  # relative: depends on the cwd
    with pytest.raises(Forbidden, match="not found"):
        await run_command(["no-such-program-anywhere"], allowed=["no-such-program-anywhere"])


async def test_a_string_is_never_run_through_a_shell(tmp_path: Path) -> None:
    with pytest.raises(TuxPilotError, match="argv list, never a string"):
        await run_command(f"echo hi; touch {tmp_path / 'x'}", allowed=["echo"])  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


async def test_shell_metacharacters_reach_the_program_literally(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    args = [a.format(x=marker) for a in METACHARACTERS]
    result = await run_command(["echo", *args], allowed=["/bin/echo"])  # /bin is /usr/bin here: same file
    assert result.ok and result.exit_code == 0
    assert result.stdout == " ".join(args) + "\n"
    assert not marker.exists()


async def test_the_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    started = time.monotonic()
    result = await run_command(
        ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; sleep 60"], allowed=["sh"], timeout_s=1
    )
    assert time.monotonic() - started < 10
    assert result.timed_out and not result.ok
    assert result.exit_code == -9
    assert result.stdout == "started\n"  # what came before the kill is kept
    child = int(pidfile.read_text())
    _, alive = psutil.wait_procs([p for p in psutil.process_iter() if p.pid == child], timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the background child survived"


async def test_output_beyond_the_cap_is_cut_and_says_so() -> None:
    result = await run_command(["head", "-c", "300000", "/dev/zero"], allowed=["head"], max_output=1000)
    assert result.exit_code == 0 and result.truncated
    assert len(result.stdout) == 1000
    small = await run_command(["echo", "short"], allowed=["echo"], max_output=1000)
    assert not small.truncated and small.stdout == "short\n"
    assert small.duration_ms > 0
    assert set(small.to_doc()) == {"argv", "exit_code", "stdout", "stderr", "truncated", "timed_out", "duration_ms"}


def test_locate_resolves_directories_but_not_the_program() -> None:
    echo = locate("echo")
    assert echo is not None and echo.name == "echo"
    assert locate(str(echo)) == echo
    assert locate("relative/echo") is None


async def test_run_command_outside_a_system_access_action_is_refused() -> None:
    plugin = load_plugin(SHELL)
    log = structlog.get_logger("test")
    in_a_task = Context(plugin, "test-host", log.bind(), {})
    with pytest.raises(Forbidden, match="only inside an action handler"):
        await in_a_task.run_command(["echo", "hi"])
    in_peek = Context(plugin, "test-host", log.bind(action="peek"), {}, action_id="a1", action="peek")
    with pytest.raises(Forbidden, match="its declared permission is filesystem_read, not system_access"):
        await in_peek.run_command(["echo", "hi"])
    in_echo = Context(plugin, "test-host", log.bind(action="echo"), {}, action_id="a2", action="echo")
    assert (await in_echo.run_command(["echo", "hi"])).stdout == "hi\n"


@pytest.fixture
async def shell(nc: Client, config: Config) -> AsyncIterator[Plugin]:
    plugin = load_plugin(SHELL)
    await plugin.start(nc, config)
    yield plugin
    await plugin.stop()


async def test_through_a_real_action_over_nats(shell: Plugin, nc: Client, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    args = [a.format(x=marker) for a in METACHARACTERS]
    reply = await nc.request("tuxpilot.exec.test-host.shell.echo", json.dumps({"args": args}).encode(), timeout=10)
    doc = json.loads(reply.data)
    assert doc["status"] == "ok", doc
    assert doc["data"]["stdout"] == " ".join(args) + "\n"
    assert not marker.exists()

    refused = await nc.request("tuxpilot.exec.test-host.shell.peek", b"{}", timeout=10)
    error = json.loads(refused.data)
    assert error["code"] == "forbidden"
    assert "system_access" in error["message"]
    assert (refused.headers or {}).get("Nats-Service-Error-Code") == "403"

