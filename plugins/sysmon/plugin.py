"""sysmon: who is eating the machine. Serves process and resource reports, and proposes a
`top_processes` report when CPU or memory runs high, so the audit trail shows the culprits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from agent.models import Event, ProposedAction, Result
from agent.sdk import ActionError, Context, Plugin


def _load_probes() -> Any:
    # The plugin is loaded by file path, not as a package: load its sibling module the same way.
    path = Path(__file__).with_name("probes.py")
    spec = importlib.util.spec_from_file_location("tuxpilot_sysmon_probes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


probes = _load_probes()
plugin = Plugin.here(__file__)


@plugin.on("cpu.high")
def cpu_high(event: Event, ctx: Context) -> list[ProposedAction]:
    return [ctx.propose("top_processes", {"by": "cpu", "n": 10}, reason=f"CPU at {event.value}%")]


@plugin.on("memory.high")
def memory_high(event: Event, ctx: Context) -> list[ProposedAction]:
    return [ctx.propose("top_processes", {"by": "memory", "n": 10}, reason=f"memory at {event.value}%")]


@plugin.action("top_processes")
def top_processes(params: dict[str, Any], ctx: Context) -> Result:
    found = probes.top_processes(params["by"], params["n"], params["sample_s"])
    message = f"{len(found)} processes by {params['by']}"
    return Result(status="ok", data={"by": params["by"], "processes": found}, message=message)


@plugin.action("process_tree")
def process_tree(params: dict[str, Any], ctx: Context) -> Result:
    roots, count = probes.process_tree(params.get("root_pid"), params["max_depth"])
    if params.get("root_pid") is not None and not roots:
        raise ActionError(f"no process {params['root_pid']}", code="not_found")
    return Result(status="ok", data={"tree": roots, "count": count}, message=f"{count} processes")


@plugin.action("resource_report")
async def resource_report(params: dict[str, Any], ctx: Context) -> Result:
    if params["interval_s"] > params["duration_s"]:
        raise ActionError("interval_s must not be longer than duration_s", code="invalid_params")
    report = await probes.resource_report(params["duration_s"], params["interval_s"])
    return Result(status="ok", data=report, message=f"{report['samples']} samples over {params['duration_s']} s")


if __name__ == "__main__":
    plugin.run()
