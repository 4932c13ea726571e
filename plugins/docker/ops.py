"""Docker operations on the `docker` SDK: plain functions over a client, returning JSON-able dicts.

Every engine failure becomes a DockerOpError with a code the caller can act on: not_found,
unavailable (engine down), forbidden (socket permission), conflict, registry_error, internal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import docker
import docker.errors
import requests

P = ParamSpec("P")
T = TypeVar("T")
CLIENT_TIMEOUT_S = 30
# A container restarting this many times is in a loop.
RESTART_LOOP = 3


# What an operator does about it: a confined plugin's user has only the groups the host config names.
SOCKET_HINT = (
    "; the plugin's user needs the socket's group, e.g. `groups = [\"docker\"]` under [plugins.docker] "
    "in the host config"
)

class DockerOpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _translate(exc: Exception) -> DockerOpError:
    if isinstance(exc, DockerOpError):
        return exc
    if isinstance(exc, docker.errors.NotFound):
        return DockerOpError("not_found", _explain(exc))
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 500
        if status == 409:
            return DockerOpError("conflict", _explain(exc))
        if status in (401, 403):
            return DockerOpError("forbidden", _explain(exc))
        return DockerOpError("internal", _explain(exc))
    if isinstance(exc, PermissionError) or "Permission denied" in str(exc):
        return DockerOpError("forbidden", f"permission denied on the Docker socket: {exc}{SOCKET_HINT}")
    if isinstance(exc, requests.exceptions.ConnectionError | ConnectionError | FileNotFoundError):
        return DockerOpError("unavailable", f"the Docker engine is not reachable: {exc}")
    if isinstance(exc, docker.errors.DockerException):
        text = str(exc)
        if "Permission denied" in text:
            return DockerOpError("forbidden", f"permission denied on the Docker socket: {text}{SOCKET_HINT}")
        if "Connection" in text or "No such file" in text:
            return DockerOpError("unavailable", f"the Docker engine is not reachable: {text}")
        return DockerOpError("internal", text)
    return DockerOpError("internal", f"{type(exc).__name__}: {exc}")


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)[:1000]


def engine_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn any engine failure into a DockerOpError."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _translate(exc) from exc

    return wrapper


@engine_errors
def client_from_env() -> docker.DockerClient:
    client = docker.from_env(timeout=CLIENT_TIMEOUT_S)
    client.ping()
    return client


def _iso(text: str | None) -> str | None:
    return text[:26].rstrip("Z") + "Z" if text else None


def _describe(c: Any) -> dict[str, Any]:
    attrs = c.attrs
    tags = c.image.tags if c.image is not None else []
    created = attrs.get("Created")
    return {
        "id": c.short_id,
        "name": c.name,
        "image": tags[0] if tags else attrs.get("Config", {}).get("Image"),
        "status": attrs.get("Status") or c.status,
        "state": attrs.get("State", {}).get("Status", c.status) if isinstance(attrs.get("State"), dict) else c.status,
        "created": _iso(created) if isinstance(created, str) else datetime.fromtimestamp(created, UTC).isoformat(),
    }


@engine_errors
def list_containers(client: docker.DockerClient, all: bool = False) -> list[dict[str, Any]]:
    found = []
    for c in client.containers.list(all=all):
        try:
            found.append(_describe(c))
        except docker.errors.NotFound:  # removed while listing
            continue
    return found


def compute_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Figures from one non-streaming stats sample, which carries the previous one as `precpu_stats`."""
    cpu, pre = raw.get("cpu_stats") or {}, raw.get("precpu_stats") or {}
    cpu_delta = cpu.get("cpu_usage", {}).get("total_usage", 0) - pre.get("cpu_usage", {}).get("total_usage", 0)
    system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or len(cpu.get("cpu_usage", {}).get("percpu_usage") or []) or 1
    cpu_percent = cpu_delta / system_delta * online * 100 if cpu_delta > 0 and system_delta > 0 else 0.0
    memory = raw.get("memory_stats") or {}
    details = memory.get("stats") or {}
    # What `docker stats` shows: usage minus the page cache that can be dropped.
    cache = details.get("inactive_file", details.get("total_inactive_file", details.get("cache", 0)))
    usage = max(memory.get("usage", 0) - cache, 0)
    limit = memory.get("limit", 0)
    networks = raw.get("networks") or {}
    blkio = (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    return {
        "cpu_percent": round(cpu_percent, 3),
        "online_cpus": online,
        "memory_usage": usage,
        "memory_limit": limit,
        "memory_percent": round(usage / limit * 100, 3) if limit else 0.0,
        "net_rx_bytes": sum(n.get("rx_bytes", 0) for n in networks.values()),
        "net_tx_bytes": sum(n.get("tx_bytes", 0) for n in networks.values()),
        "block_read_bytes": sum(e.get("value", 0) for e in blkio if e.get("op", "").lower() == "read"),
        "block_write_bytes": sum(e.get("value", 0) for e in blkio if e.get("op", "").lower() == "write"),
        "pids": (raw.get("pids_stats") or {}).get("current", 0),
    }


@engine_errors
def container_stats(client: docker.DockerClient, container: str) -> dict[str, Any]:
    c = client.containers.get(container)
    if c.status != "running":
        raise DockerOpError("conflict", f"container {c.name} is {c.status}, not running: no stats")
    return {"id": c.short_id, "name": c.name, **compute_stats(c.stats(stream=False))}


def _state(c: Any) -> dict[str, Any]:
    c.reload()
    return {"id": c.short_id, "name": c.name, "state": c.status}


@engine_errors
def start_container(client: docker.DockerClient, container: str) -> dict[str, Any]:
    c = client.containers.get(container)
    c.start()
    return _state(c)


@engine_errors
def stop_container(client: docker.DockerClient, container: str, timeout: int = 10) -> dict[str, Any]:
    c = client.containers.get(container)
    c.stop(timeout=timeout)
    return _state(c)


@engine_errors
def restart_container(client: docker.DockerClient, container: str, timeout: int = 10) -> dict[str, Any]:
    c = client.containers.get(container)
    c.restart(timeout=timeout)
    return _state(c)


@engine_errors
def remove_container(
    client: docker.DockerClient, container: str, force: bool = False, volumes: bool = False
) -> dict[str, Any]:
    c = client.containers.get(container)
    c.remove(force=force, v=volumes)
    return {"id": c.short_id, "name": c.name, "state": "removed"}


@engine_errors
def pull_image(client: docker.DockerClient, image: str, tag: str = "latest") -> dict[str, Any]:
    try:
        pulled = client.images.pull(image, tag=tag)
    except (docker.errors.APIError, docker.errors.ImageNotFound) as exc:
        raise DockerOpError("registry_error", f"pulling {image}:{tag} failed: {_explain(exc)}") from exc
    return {"id": pulled.short_id, "tags": pulled.tags}


@engine_errors
def list_images(client: docker.DockerClient) -> list[dict[str, Any]]:
    return [
        {
            "id": i.short_id,
            "tags": i.tags,
            "size": i.attrs.get("Size", 0),
            "created": _iso(i.attrs.get("Created")),
        }
        for i in client.images.list()
    ]


@engine_errors
def prune(client: docker.DockerClient) -> dict[str, Any]:
    containers = client.containers.prune()
    images = client.images.prune(filters={"dangling": True})
    volumes = client.volumes.prune()
    networks = client.networks.prune()
    reclaimed = sum(r.get("SpaceReclaimed") or 0 for r in (containers, images, volumes))
    return {
        "containers": containers.get("ContainersDeleted") or [],
        "images": [next(iter(d.values())) for d in images.get("ImagesDeleted") or []],
        "volumes": volumes.get("VolumesDeleted") or [],
        "networks": networks.get("NetworksDeleted") or [],
        "space_reclaimed": reclaimed,
    }


@engine_errors
def memory_hungry_containers(client: docker.DockerClient, n: int = 5) -> list[dict[str, Any]]:
    """The seed's identify_memory_hungry_containers: running containers by memory use, biggest first."""
    found = []
    for c in client.containers.list():
        try:
            figures = compute_stats(c.stats(stream=False))
        except docker.errors.NotFound:
            continue
        found.append(
            {
                "id": c.short_id,
                "name": c.name,
                "memory_usage": figures["memory_usage"],
                "memory_limit": figures["memory_limit"],
                "memory_percent": figures["memory_percent"],
            }
        )
    return sorted(found, key=lambda c: c["memory_usage"], reverse=True)[:n]


@engine_errors
def unhealthy_containers(client: docker.DockerClient) -> list[dict[str, Any]]:
    """Containers whose health check says unhealthy, or that are restarting in a loop."""
    sick = []
    for c in client.containers.list(all=True):
        state = c.attrs.get("State") or {}
        health = (state.get("Health") or {}).get("Status")
        restarts = c.attrs.get("RestartCount", 0)
        if health == "unhealthy":
            reason = "health check failing"
        elif state.get("Restarting") or (restarts >= RESTART_LOOP and state.get("Status") != "running"):
            reason = f"restarting in a loop ({restarts} restarts)"
        else:
            continue
        sick.append({"id": c.short_id, "name": c.name, "reason": reason, "restarts": restarts, "health": health})
    return sick
