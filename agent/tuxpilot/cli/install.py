"""`tuxpilot plugin install|update|remove`: asks the host's agent (or, with --hosts/--label/--all, every
targeted host's agent) to install, update or remove a plugin; the agent verifies and does the work."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tuxpilot.agent.config import Config
from tuxpilot.cli.call import roster
from tuxpilot.cli.common import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_row,
    config_of,
    connect,
    fail,
    out,
    run_async,
    table,
)
from tuxpilot.fleet.gather import HostReply, gather_on
from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.names import Subjects

# npm ci and a health check may take a while: an install is not an action call.
DEFAULT_TIMEOUT_S = 180.0

Grant = Annotated[list[str] | None, typer.Option("--grant", help="A dangerous permission to grant (repeatable).")]
Registry = Annotated[str | None, typer.Option("--registry", help="The registry to fetch from (default: the host's).")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the agent(s).")]
Hosts = Annotated[str | None, typer.Option("--hosts", help="Every host matching these globs: 'web-*,db-1'.")]
Labels = Annotated[list[str] | None, typer.Option("--label", help="key=value the hosts must carry.")]
AllHosts = Annotated[bool, typer.Option("--all", help="Every host of the fleet.")]
FleetDir = Annotated[Path | None, typer.Option(
    "--fleet-dir", envvar="TUXPILOT_FLEET_DIR", help="The fleet's folder: its roster names who did not answer.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the agent's reply (or every host's) as JSON.")]


def package_request(what: str, grant: list[str], registry: str | None) -> dict[str, Any]:
    """FILE is sent as it is (the agent verifies it itself); NAME[@VERSION] is fetched by the agent."""
    path = Path(what)
    doc: dict[str, Any] = {"grant": grant}
    if path.is_file():
        doc["package"] = base64.b64encode(path.read_bytes()).decode()
    elif "/" in what or what.endswith(".tpk"):
        fail(f"{what}: no such package file", EXIT_USAGE)
    else:
        name, _, version = what.partition("@")
        doc |= {"name": name, "version": version or None, "registry": registry}
    return doc


def fits(nc: Client, body: bytes) -> None:
    if len(body) > nc.max_payload:
        fail(f"the request ({len(body)} bytes) is larger than the server's max_payload ({nc.max_payload} bytes): "
             "publish the package to a registry (`tuxpilot plugin publish`) and install it by name", EXIT_USAGE)


def plugin_install(
    ctx: typer.Context,
    package: Annotated[str, typer.Argument(help="NAME or NAME@VERSION from a registry, or a package FILE.")],
    grant: Grant = None, registry: Registry = None, timeout: Timeout = DEFAULT_TIMEOUT_S,
    hosts: Hosts = None, label: Labels = None, all_hosts: AllHosts = False, fleet_dir: FleetDir = None,
    as_json: AsJson = False,
) -> None:
    """Install a plugin: the agent verifies the package against its trusted keys, checks its dependencies,
    unpacks it, and starts it without a restart. Dangerous permissions are granted only with --grant."""
    request = package_request(package, grant or [], registry)
    _send(ctx, "install", request, timeout, hosts, label, all_hosts, fleet_dir, as_json)


def plugin_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="NAME (its newest version this host runs), NAME@VERSION, or a FILE.")],
    grant: Grant = None, registry: Registry = None, timeout: Timeout = DEFAULT_TIMEOUT_S,
    hosts: Hosts = None, label: Labels = None, all_hosts: AllHosts = False, fleet_dir: FleetDir = None,
    as_json: AsJson = False,
) -> None:
    """Move an installed plugin to another version; rolled back automatically when the new one does not
    start or answer its health check."""
    request = package_request(name, grant or [], registry)
    _send(ctx, "update", request, timeout, hosts, label, all_hosts, fleet_dir, as_json)


def plugin_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="An installed plugin.")],
    timeout: Timeout = 60.0,
    hosts: Hosts = None, label: Labels = None, all_hosts: AllHosts = False, fleet_dir: FleetDir = None,
    as_json: AsJson = False,
) -> None:
    """Stop an installed plugin and delete its files, credentials, consumer, registry entry and grants."""
    _send(ctx, "remove", {"name": name}, timeout, hosts, label, all_hosts, fleet_dir, as_json)


def _send(ctx: typer.Context, verb: str, request: dict[str, Any], timeout: float, hosts: str | None,
          labels: list[str] | None, all_hosts: bool, fleet_dir: Path | None, as_json: bool) -> None:
    config = config_of(ctx)
    body = json.dumps(request).encode()
    if hosts or labels or all_hosts:
        _fleet(config, verb, body, timeout, hosts, labels or [], fleet_dir, as_json)
        return

    async def main() -> dict[str, Any]:
        nc = await connect(config)  # as the operator, who alone may ask the agent
        try:
            fits(nc, body)
            msg = await nc.request(Subjects.of(config).agent_control(verb), body, timeout=timeout)
        except NoRespondersError:
            fail(f"no agent for host {config.host_id} answers: is `tuxpilot up` (or `tuxpilot agent`) running?",
                 EXIT_UNAVAILABLE)
        except NatsTimeout:
            fail(f"the agent did not answer within {timeout:g} s (it may still finish: `tuxpilot plugin list`)",
                 EXIT_TIMEOUT)
        finally:
            await nc.close()
        try:
            doc: dict[str, Any] = json.loads(msg.data)
        except ValueError:
            fail("the agent's answer is not JSON", EXIT_FAILED)
        return doc

    doc = run_async(main())
    if as_json:
        out.print_json(json.dumps(doc))
    if "code" in doc:
        if not as_json:
            fail(f"{verb}: {doc.get('message')}", EXIT_USAGE if doc["code"] in ("bad_request", "not_found",
                                                                               "conflict") else EXIT_FAILED)
        raise typer.Exit(EXIT_FAILED)
    if not as_json:
        for line in describe(verb, doc):
            out.print(line, markup=False)


def describe(verb: str, doc: dict[str, Any]) -> list[str]:
    """What an agent did, in a few lines: the version, where from, who signed it, what it may do."""
    name, version = doc.get("plugin"), doc.get("version")
    if verb == "remove":
        tail = f", grants and image {doc['image']}" if doc.get("image") else " and grants"
        return [f"removed {name} {version}: its process, files, credentials, consumer, registry entry{tail}"]
    previous = f" (was {doc['previous']})" if doc.get("previous") else ""
    signer = "UNSIGNED"
    if doc.get("signed"):
        signer = f"signed by key {doc['publisher']}" + ("" if doc.get("trusted", True) else " (NOT a trusted key)")
    done = {"install": "installed", "update": "updated"}[verb]
    lines = [f"{done} {name} {version}{previous}: {signer}, sha256 {str(doc.get('sha256'))[:16]}…, "
             f"from {doc.get('source')}; running and healthy"]
    lines.append(f"granted: {', '.join(doc.get('granted') or []) or 'nothing'}")
    withheld = doc.get("not_granted") or []
    if withheld:
        lines.append(f"dangerous permissions asked for and NOT granted: {', '.join(withheld)} "
                     f"(`tuxpilot plugin grant {name} {' '.join(withheld)}` grants them)")
    return lines


def _fleet(config: Config, verb: str, body: bytes, timeout: float, hosts: str | None, labels: list[str],
           fleet_dir: Path | None, as_json: bool) -> None:
    try:
        targets = Targets.parse(hosts, ",".join(labels))
    except TuxPilotError as exc:
        fail(exc.message, EXIT_USAGE)
    enrolled = roster(fleet_dir)
    expected = None if enrolled is None else {h for h, lab in enrolled.items() if targets.match(h, lab)}

    async def main() -> list[HostReply]:
        nc = await connect(config)
        try:
            fits(nc, body)
            return await gather_on(nc, Subjects.of(config).fleet_agent(verb), body, targets, deadline_s=timeout,
                                   expected=expected)
        finally:
            await nc.close()

    replies: list[HostReply] = run_async(main())
    missing = (expected or set()) - {r.host for r in replies}
    if as_json:
        out.print_json(json.dumps({"replies": {r.host: json.loads(r.body) for r in replies},
                                   "no_answer": sorted(missing)}))
    else:
        grid = table("host", "status", "version", "detail")
        for reply in replies:
            doc = json.loads(reply.body) if reply.status == "ok" else {}
            detail = "; ".join(describe(verb, doc)[1:]) if doc else reply.summary
            add_row(grid, reply.host, reply.status, str(doc.get("version") or "-"), detail)
        out.print(grid)
        if expected is None:
            out.print(f"{len(replies)} host(s) answered within {timeout:g} s (no fleet roster: --fleet-dir names "
                      "who should have)")
        else:
            out.print(f"{len(replies)} of {len(expected)} targeted host(s) answered"
                      + (f"; no answer from: {', '.join(sorted(missing))}" if missing else ""))
    raise typer.Exit(EXIT_FAILED if missing or not replies or any(r.status != "ok" for r in replies) else 0)
