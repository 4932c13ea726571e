"""One state dir, one agent: an exclusive lock on `<state dir>/agent.lock` for the agent's whole life.

Two agents on one state dir would run two servers on one JetStream store, and the first to stop would
delete the other's `nats.url`. The kernel drops the lock when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tuxpilot.protocol.errors import ConfigError

LOCK_FILE = "agent.lock"


def lock_file(state_dir: Path) -> Path:
    return state_dir / LOCK_FILE


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[Path]:
    """Hold the state dir's lock, or raise ConfigError naming the agent that holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = lock_file(state_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"state dir {state_dir} is in use by another agent (pid {holder}, lock {path}): "
                "stop that one, or give this one another state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race the next agent's open)
