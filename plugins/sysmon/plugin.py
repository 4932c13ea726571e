"""sysmon: who is eating the machine. Serves process and resource reports, and proposes a
`top_processes` report when CPU or memory runs high, so the audit trail shows the culprits."""

from __future__ import annotations

from typing import Any

from tuxpilot import ActionError, Context, Event, Plugin, ProposedAction, Result, sibling

probes = sibling(__file__, "probes")
plugin = Plugin.here(__file__)


def _reason(what: str, event: Event) -> str:
    return f"{what} at {event.value:g}%" if event.value is not None else f"{what} high"


@plugin.on("cpu.high")
async def cpu_high(event: Event, ctx: Context) -> list[ProposedAction]:
    return [ctx.propose("top_processes", {"by": "cpu", "n": 10}, reason=_reason("CPU", event))]


@plugin.on("memory.high")
async def memory_high(event: Event, ctx: Context) -> list[ProposedAction]:
    return [ctx.propose("top_processes", {"by": "memory", "n": 10}, reason=_reason("memory", event))]


@plugin.action("top_processes")
def top_processes(params: dict[str, Any], ctx: Context) -> Result:
    found = probes.top_processes(params["by"], params["n"], params["sample_s"])
    message = f"{len(found)} processes by {params['by']}"
    return Result(status="ok", data={"by": params["by"], "processes": found}, message=message)


@plugin.action("process_tree")
def process_tree(params: dict[str, Any], ctx: Context) -> Result:
    root_pid = params.get("root_pid")
    roots, count = probes.process_tree(root_pid, params["max_depth"], params["sample_s"])
    if root_pid is not None and not roots:
        raise ActionError(f"no process {root_pid}", code="not_found")
    return Result(status="ok", data={"tree": roots, "count": count}, message=f"{count} processes")


@plugin.action("resource_report")
async def resource_report(params: dict[str, Any], ctx: Context) -> Result:
    duration_s, interval_s = params["duration_s"], params["interval_s"]
    if interval_s > duration_s:
        raise ActionError(f"interval_s ({interval_s}) is longer than duration_s ({duration_s})", code="invalid_params")
    report = await probes.resource_report(duration_s, interval_s)
    message = f"{report['samples']} samples over {duration_s:g} s, {report['anomaly_count']} anomalies"
    return Result(status="ok", data=report, message=message)


if __name__ == "__main__":
    plugin.run()
