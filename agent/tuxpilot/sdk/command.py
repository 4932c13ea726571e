"""Running system commands from a plugin: an argv list (never a shell), a program from the manifest's
`commands`, a timeout that kills the whole process group, capped output. Plugins reach it as
`ctx.run_command(argv)`, which needs `system_access`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from tuxpilot.protocol.errors import Forbidden, TuxPilotError
from tuxpilot.protocol.manifest import Permission

if TYPE_CHECKING:
    from tuxpilot.sdk.plugin import Context

log = structlog.get_logger("tuxpilot.command")

# Names in the allow-list and in argv[0] are found here, never on the caller's PATH.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT_S = 30.0
MAX_OUTPUT = 1024 * 1024  # bytes kept of stdout, and of stderr
KILL_GRACE_S = 5.0  # after the kill, how long the pipes may take to close
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class CommandResult:
    """What a command did. `exit_code` is negative when a signal ended it (-9: killed at the timeout)."""

    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)


def locate(program: str, path: str = SAFE_PATH) -> Path | None:
    """The file `program` names: an absolute path as it is, a bare name looked up on `path`; a relative
    path with a slash is refused (it would depend on the working directory).

    Directories are resolved (merged /bin and /usr/bin compare equal) but not the program itself: for a
    multi-call binary (busybox) the name is what selects the command, so `ls` must not allow `rm`.
    """
    if os.path.isabs(program):
        found: str | None = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    elif "/" in program:
        return None
    else:
        found = shutil.which(program, path=path)
    if found is None:
        return None
    where = Path(found)
    return Path(os.path.realpath(where.parent)) / where.name


def check_program(program: str, allowed: Sequence[str]) -> Path:
    """The file to run for `program`, if the allow-list names it (compared after locating both)."""
    target = locate(program)
    if target is None:
        raise Forbidden(f"program {program!r} not found (bare names are looked up on {SAFE_PATH})",
                        details={"program": program})
    if target not in {p for name in allowed if (p := locate(name)) is not None}:
        raise Forbidden(f"program {program!r} ({target}) is not in the manifest's `commands`",
                        details={"program": program, "allowed": list(allowed)})
    return target


def check_argv(argv: object) -> list[str]:
    if isinstance(argv, str | bytes):
        raise TuxPilotError(
            f"run_command takes an argv list, never a string for a shell: {argv!r}; "
            "write it as a list, e.g. ['systemctl', 'restart', 'nginx']"
        )
    if not isinstance(argv, list | tuple) or not argv:
        raise TuxPilotError("run_command takes a non-empty argv list")
    if not all(isinstance(a, str) for a in argv):
        raise TuxPilotError("run_command: every argv item must be a str")
    if any("\0" in a for a in argv):
        raise TuxPilotError("run_command: an argument holds a NUL byte")
    return list(argv)


class _Capture:
    """One output stream read to its end, keeping the first `cap` bytes: reading on keeps the child
    from blocking on a full pipe, and what was kept survives a kill."""

    def __init__(self, cap: int):
        self.cap = cap
        self.kept = bytearray()
        self.truncated = False

    async def read(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(_CHUNK):
            room = self.cap - len(self.kept)
            if len(chunk) > room:
                self.truncated = True
            self.kept += chunk[: max(room, 0)]

    def text(self) -> str:
        return self.kept.decode(errors="replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def run_command(
    argv: list[str],
    *,
    allowed: Sequence[str],
    timeout_s: float = TIMEOUT_S,
    max_output: int = MAX_OUTPUT,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    logger: Any = None,
) -> CommandResult:
    """Run `argv` without a shell: argv[0] must be in `allowed`; stdin is /dev/null; after `timeout_s`
    the command's whole process group is killed; each of stdout and stderr keeps `max_output` bytes."""
    argv = check_argv(argv)
    program = check_program(argv[0], allowed)
    environment = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", **(env or {})}
    started = time.perf_counter()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(program), *argv[1:], cwd=cwd, env=environment, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
    except OSError as exc:
        raise TuxPilotError(f"cannot run {program}: {exc.strerror}", details={"argv": argv}) from exc
    out, err = _Capture(max_output), _Capture(max_output)
    done = asyncio.gather(out.read(proc.stdout), err.read(proc.stderr), proc.wait())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        timed_out = True
    finally:
        if not done.done():  # timed out or cancelled: the command, and every child it started, goes
            _kill_group(proc.pid)  # a new session's leader: its pid is the group's id
            try:
                await asyncio.wait_for(asyncio.shield(done), KILL_GRACE_S)
            except TimeoutError:  # a child that left the group still holds the pipes: stop reading
                done.cancel()
                await proc.wait()
    result = CommandResult(
        argv=argv,
        exit_code=proc.returncode if proc.returncode is not None else -signal.SIGKILL,
        stdout=out.text(),
        stderr=err.text(),
        truncated=out.truncated or err.truncated,
        timed_out=timed_out,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    (logger or log).info("command.ran", program=str(program), argc=len(argv), exit_code=result.exit_code,
                         timed_out=timed_out, truncated=result.truncated, ms=result.duration_ms)
    return result


def check_system_access(ctx: Context) -> None:
    """`run_command` is for an action whose declared permission is system_access, and nothing else.

    The gate runs such an action only once the host granted system_access; an event handler or a
    task has no such grant to stand on.
    """
    manifest = ctx.plugin.manifest
    action = ctx.action
    if action is None:
        raise Forbidden(f"{manifest.name}: run_command works only inside an action handler")
    spec = manifest.actions.get(action)
    if spec is None or spec.permission != Permission.system_access:
        declared = spec.permission.value if spec is not None and spec.permission is not None else "none"
        raise Forbidden(
            f"{manifest.name}.{action} may not run commands: its declared permission is {declared}, "
            "not system_access",
            details={"action": action, "permission": declared},
        )
    if Permission.system_access not in manifest.permissions:
        raise Forbidden(f"{manifest.name}: the manifest does not ask for system_access")


async def run_for(ctx: Context, argv: list[str], **options: Any) -> CommandResult:
    """`ctx.run_command`: the permission checks, then `run_command` with the manifest's allow-list."""
    check_system_access(ctx)
    return await run_command(argv, allowed=ctx.plugin.manifest.commands, logger=ctx.log, **options)
