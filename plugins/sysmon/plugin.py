"""sysmon: who is eating the machine. Serves process and resource reports, and proposes a
`top_processes` report when CPU or memory runs high, so the audit trail shows the culprits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.models import Event, ProposedAction, Result
from agent.sdk import ActionError, Context, Plugin


def _sibling(name: str) -> ModuleType:
    # The plugin is loaded by file path, not as a package, and a bare `import probes` would clash with
    # any other plugin's probes.py: import the sibling by path, under a name of its own.
    spec = importlib.util.spec_from_file_location(f"tuxpilot_sysmon_{name}", Path(__file__).with_name(f"{name}.py"))
    if spec is None or spec.loader is None:
        raise ImportError(f"sysmon: cannot import {name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


probes = _sibling("probes")
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
