"""The process that stands for one container plugin: `python -m tuxpilot.runtimes.container_run FOLDER`.

The plugin host starts it like any plugin process (and so restarts it, counts its crash loops, stops it).
It removes a container of the same name that a crashed agent left, creates the plugin's container as the
host decided (`TUXPILOT_CONTAINER`: the image, docker-py's create options, whether the bus goes through
a relay), streams the container's output to its own, and exits with the container's exit status. On
SIGTERM (the host stopping it, or the agent dying: the parent-death signal) it stops and removes the
container before it exits. It imports nothing but the docker SDK and the relay: it runs once per
container plugin.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from tuxpilot.runtimes import container_relay

# The one place this variable's name is written (runtimes/container.py sets it).
SPEC = "TUXPILOT_CONTAINER"
# A stopped container gets this long to exit before the engine kills it; less than the host's own grace
# for this process (5 s), so the container is gone before this process could be killed.
STOP_TIMEOUT_S = 3
EXIT_UNAVAILABLE = 3


def _pump(container: Any) -> None:
    """The container's output as this process's (the host's log of the plugin)."""
    with contextlib.suppress(Exception):  # ends when the container does, or the engine goes away
        for chunk in container.logs(stream=True, follow=True):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()


def run(env: dict[str, str]) -> int:
    import docker
    import docker.errors

    doc = json.loads(env[SPEC])
    options: dict[str, Any] = doc["options"]
    name = options["name"]
    client = docker.from_env()
    stop = threading.Event()
    current: list[Any] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        for container in current:
            with contextlib.suppress(docker.errors.DockerException):
                container.stop(timeout=STOP_TIMEOUT_S)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with contextlib.suppress(docker.errors.NotFound):  # a leftover of an agent that died
            client.containers.get(name).remove(force=True)
        container = client.containers.create(doc["image"], **options)
    except docker.errors.DockerException as exc:
        sys.stderr.write(f"container {name} ({doc['image']}) not created: {exc}\n")
        return EXIT_UNAVAILABLE
    try:
        current.append(container)
        if stop.is_set():
            return 0
        container.start()
        if doc["relay"]:
            container.reload()
            try:
                listener = container_relay.listen_in(container.attrs["State"]["Pid"])
            except OSError as exc:
                sys.stderr.write(f"container {name}: no way to the bus in its network namespace: {exc}\n")
                return EXIT_UNAVAILABLE
            container_relay.relay(listener, container_relay.upstreams(doc["upstreams"]))
        threading.Thread(target=_pump, args=(container,), daemon=True).start()
        try:
            status = container.wait(timeout=None)
        except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
            if stop.is_set():
                return 0
            sys.stderr.write(f"container {name}: lost the engine while waiting: {exc}\n")
            return EXIT_UNAVAILABLE
        return int(status.get("StatusCode", 1))
    except docker.errors.DockerException as exc:
        sys.stderr.write(f"container {name} failed: {exc}\n")
        return EXIT_UNAVAILABLE
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            container.remove(force=True)
        client.close()


if __name__ == "__main__":
    sys.exit(run(dict(os.environ)))
