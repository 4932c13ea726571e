"""docker: manage containers and images on this host's Docker Engine through the `docker` SDK.

Reacts to `memory.high` (records the memory-hungriest containers) and `disk.low` (proposes `prune`,
which the gate runs dry until the host grants `system_access`), and emits `container.unhealthy`
when a container turns unhealthy or keeps restarting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from tuxpilot import ActionError, Context, Event, Plugin, ProposedAction, Result, sibling

ops = sibling(__file__, "ops")
plugin = Plugin.here(__file__)


class Engine:
    """One client, made on first use and made again after the engine went away."""

    def __init__(self) -> None:
        self._client: Any = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            client = self._client
        try:
            return fn(client, *args, **kwargs)
        except ops.DockerOpError as exc:
            if exc.code == "unavailable":
                with self._lock:
                    self._client = None  # reconnect next time: the engine may be restarting
            raise ActionError(exc.message, code=exc.code) from None

    @staticmethod
    def _connect() -> Any:
        try:
            return ops.client_from_env()
        except ops.DockerOpError as exc:
            raise ActionError(exc.message, code=exc.code) from None


engine = Engine()
# Containers already reported unhealthy, so a lasting condition is reported once, not every check.
_reported: set[str] = set()


@plugin.on("memory.high")
def memory_high(event: Event, ctx: Context) -> list[ProposedAction]:
    n = int(ctx.config.get("hungry_n", 5))
    return [ctx.propose("memory_hungry_containers", {"n": n}, reason=f"memory at {event.value}%")]


@plugin.on("disk.low")
def disk_low(event: Event, ctx: Context) -> list[ProposedAction]:
    return [ctx.propose("prune", {}, reason=f"disk {event.resource} at {event.value}%")]


def _ok(data: Any, message: str) -> Result:
    return Result(status="ok", data=data, message=message)


@plugin.action("list_containers")
def list_containers(params: dict[str, Any], ctx: Context) -> Result:
    found = engine.call(ops.list_containers, params["all"])
    return _ok({"containers": found}, f"{len(found)} containers")


@plugin.action("container_stats")
def container_stats(params: dict[str, Any], ctx: Context) -> Result:
    stats = engine.call(ops.container_stats, params["container"])
    return _ok(stats, f"{params['container']}: cpu {stats.get('cpu_percent')}%, memory {stats.get('memory_usage')} B")


@plugin.action("memory_hungry_containers")
def memory_hungry_containers(params: dict[str, Any], ctx: Context) -> Result:
    found = engine.call(ops.memory_hungry_containers, params["n"])
    return _ok({"containers": found}, f"{len(found)} containers by memory")


@plugin.action("list_images")
def list_images(params: dict[str, Any], ctx: Context) -> Result:
    found = engine.call(ops.list_images)
    return _ok({"images": found}, f"{len(found)} images")


@plugin.action("start_container")
def start_container(params: dict[str, Any], ctx: Context) -> Result:
    return _ok(engine.call(ops.start_container, params["container"]), f"started {params['container']}")


@plugin.action("stop_container")
def stop_container(params: dict[str, Any], ctx: Context) -> Result:
    state = engine.call(ops.stop_container, params["container"], params["timeout"])
    return _ok(state, f"stopped {params['container']}")


@plugin.action("restart_container")
def restart_container(params: dict[str, Any], ctx: Context) -> Result:
    state = engine.call(ops.restart_container, params["container"], params["timeout"])
    return _ok(state, f"restarted {params['container']}")


@plugin.action("remove_container")
def remove_container(params: dict[str, Any], ctx: Context) -> Result:
    state = engine.call(ops.remove_container, params["container"], params["force"], params["volumes"])
    return _ok(state, f"removed {params['container']}")


@plugin.action("pull_image")
def pull_image(params: dict[str, Any], ctx: Context) -> Result:
    image = engine.call(ops.pull_image, params["image"], params["tag"])
    return _ok(image, f"pulled {params['image']}:{params['tag']}")


@plugin.action("prune")
def prune(params: dict[str, Any], ctx: Context) -> Result:
    report = engine.call(ops.prune)
    return _ok(report, f"reclaimed {report.get('space_reclaimed', 0)} bytes")


@plugin.every("health_interval_s")
async def watch_health(ctx: Context) -> None:
    """Emit `container.unhealthy` once per container that turns unhealthy or restarts in a loop."""
    import asyncio

    try:
        sick = await asyncio.to_thread(engine.call, ops.unhealthy_containers)
    except ActionError as exc:
        ctx.log.info("docker.health_unknown", error=exc.message)
        return
    now = {c["id"] for c in sick}
    for container in sick:
        if container["id"] in _reported:
            continue
        await ctx.emit(
            "container.unhealthy",
            severity="warning",
            resource=container["name"],
            data=container,
        )
        ctx.log.warning("docker.unhealthy", container=container["name"], reason=container.get("reason"))
    _reported.intersection_update(now)
    _reported.update(now)


if __name__ == "__main__":
    plugin.run()
