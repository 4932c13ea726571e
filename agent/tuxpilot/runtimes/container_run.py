"""The process that stands for one container plugin: `python -m tuxpilot.runtimes.container_run FOLDER`.

The plugin host starts it like any plugin process (and so restarts it, counts its crash loops, stops it).
It removes a container of the same name that a crashed agent left, creates the plugin's container with
the hardening flags and the spec the host put in `TUXPILOT_CONTAINER`, streams the container's output to
its own, and exits with the container's exit status. On SIGTERM (the host stopping it, or the agent dying:
the parent-death signal) it stops and removes the container before it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from tuxpilot.protocol import launch
from tuxpilot.runtimes import container_relay
from tuxpilot.runtimes.container import CREDENTIAL_MOUNT, SPEC

# A stopped container gets this long to exit before the engine kills it; less than the host's own grace
# for this process (5 s), so the container is gone before this process could be killed.
STOP_TIMEOUT_S = 3
EXIT_UNAVAILABLE = 3
TMPFS = "rw,nosuid,nodev,noexec,size=64m,mode=1777"
# Of the host's launch environment, what makes sense inside the container: the TUXPILOT_* settings and
# the locale, never the host's PATH, PYTHONPATH or DOCKER_HOST.
KEEP = ("LANG", "LC_ALL", "TZ")
# Host paths in the environment that the container gets as read-only mounts at the same path.
TLS_FILES = tuple(launch.env_name("nats", key) for key in ("tls_ca", "tls_cert", "tls_key"))


@dataclass(frozen=True)
class ContainerSpec:
    """What the host decided for the container (the JSON in TUXPILOT_CONTAINER)."""

    name: str
    image: str
    user: str  # uid:gid
    manifest: dict[str, Any]
    limits: dict[str, int] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    credential: str | None = None
    cpus: float = 1.0
    network: str = "host"
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> ContainerSpec:
        return cls(**json.loads(env[SPEC]))


def environment(spec: ContainerSpec, env: dict[str, str]) -> dict[str, str]:
    """The container's environment: the plugin's launch environment with the paths it has in there."""
    inside = {k: v for k, v in env.items() if (k.startswith(launch.ENV_PREFIX) or k in KEEP) and k != SPEC}
    for key in (launch.NATS_USER_FILE, launch.env_name("nats", "creds")):
        if key in inside:
            inside[key] = credential_path(spec)
    if spec.network == "none":  # the bus through the relay into its own namespace, and nothing else
        inside[launch.NATS_URL] = container_relay.URL
    inside[launch.STATE_DIR] = "/tmp"
    inside["HOME"] = "/tmp"
    # The manifest the HOST loaded: the container serves and announces this one, not one of its own.
    inside[launch.MANIFEST] = json.dumps(spec.manifest, separators=(",", ":"))
    return inside


def credential_path(spec: ContainerSpec) -> str:
    suffix = os.path.splitext(spec.credential or "")[1]
    return CREDENTIAL_MOUNT + suffix


def create_options(spec: ContainerSpec, env: dict[str, str]) -> dict[str, Any]:
    """docker-py's `containers.create` keywords for the spec: the hardening flags and the limits."""
    import docker.types

    limits = spec.limits
    volumes = {}
    if spec.credential is not None:
        volumes[spec.credential] = {"bind": credential_path(spec), "mode": "ro"}
    for key in TLS_FILES:
        if env.get(key):
            volumes[env[key]] = {"bind": env[key], "mode": "ro"}
    ulimits = [docker.types.Ulimit(name=n, soft=limits[k], hard=limits[k])
               for k, n in (("cpu_s", "cpu"), ("open_files", "nofile")) if k in limits]
    options: dict[str, Any] = {
        "name": spec.name,
        "environment": environment(spec, env),
        "user": spec.user,
        "group_add": [str(g) for g in spec.groups],
        "read_only": True,
        "tmpfs": {"/tmp": TMPFS},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "network_mode": spec.network,
        "volumes": volumes,
        "ulimits": ulimits,
        "nano_cpus": int(spec.cpus * 1e9),
        "init": True,  # a real PID 1: signals forwarded, zombies reaped
        "labels": spec.labels,
        "detach": True,
    }
    if "memory_mb" in limits:
        options["mem_limit"] = options["memswap_limit"] = limits["memory_mb"] * 2**20
    if "processes" in limits:
        options["pids_limit"] = limits["processes"]
    return options


def _pump(container: Any) -> None:
    """The container's output as this process's (the host's log of the plugin)."""
    with contextlib.suppress(Exception):  # ends when the container does, or the engine goes away
        for chunk in container.logs(stream=True, follow=True):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()


def run(env: dict[str, str]) -> int:
    import docker
    import docker.errors

    spec = ContainerSpec.from_env(env)
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
            client.containers.get(spec.name).remove(force=True)
        container = client.containers.create(spec.image, **create_options(spec, env))
    except docker.errors.DockerException as exc:
        sys.stderr.write(f"container {spec.name} ({spec.image}) not created: {exc}\n")
        return EXIT_UNAVAILABLE
    try:
        current.append(container)
        if stop.is_set():
            return 0
        container.start()
        if spec.network == "none":
            container.reload()
            try:
                listener = container_relay.listen_in(container.attrs["State"]["Pid"])
            except OSError as exc:
                sys.stderr.write(f"container {spec.name}: no way to the bus in its network namespace: {exc}\n")
                return EXIT_UNAVAILABLE
            container_relay.relay(listener, container_relay.upstreams(env.get(launch.NATS_URL, "")))
        threading.Thread(target=_pump, args=(container,), daemon=True).start()
        try:
            status = container.wait(timeout=None)
        except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
            if stop.is_set():
                return 0
            sys.stderr.write(f"container {spec.name}: lost the engine while waiting: {exc}\n")
            return EXIT_UNAVAILABLE
        return int(status.get("StatusCode", 1))
    except docker.errors.DockerException as exc:
        sys.stderr.write(f"container {spec.name} failed: {exc}\n")
        return EXIT_UNAVAILABLE
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            container.remove(force=True)
        client.close()


if __name__ == "__main__":
    sys.exit(run(dict(os.environ)))
