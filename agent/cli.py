"""The `tuxpilot` command line: parses, calls the library, renders. No logic lives only here.

Exit codes: 0 done, 1 the action or command failed, 2 bad usage or config, 3 no server or no
responders, 4 timeout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from agent import __version__, bus, schemas
from agent.app import Agent, plugin_dirs
from agent.config import Config, load_config
from agent.errors import ConfigError, TuxPilotError
from agent.log import setup as setup_logging
from agent.manifest import discover
from agent.models import Event, new_id, now
from agent.registry import live_instances, open_bucket

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3, 4

app = typer.Typer(help="TuxPilot: event-driven automation for Linux fleets on NATS.", no_args_is_help=True)
plugin_app = typer.Typer(help="Plugins: list, run.", no_args_is_help=True)
event_app = typer.Typer(help="Inject test events.", no_args_is_help=True)
events_app = typer.Typer(help="Watch events.", no_args_is_help=True)
schema_app = typer.Typer(help="The JSON Schemas that are the contract with plugins.", no_args_is_help=True)
app.add_typer(plugin_app, name="plugin")
app.add_typer(event_app, name="event")
app.add_typer(events_app, name="events")
app.add_typer(schema_app, name="schema")
auth_app = typer.Typer(help="The NATS authorization TuxPilot generates for its users.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _config(ctx: typer.Context) -> Config:
    config: Config = ctx.obj
    return config


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config file (default: $TUXPILOT_CONFIG).")
    ] = None,
) -> None:
    try:
        ctx.obj = load_config(config)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    setup_logging(ctx.obj.log.level, ctx.obj.log.format)


def _run(coro: Awaitable[Any]) -> Any:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    except TuxPilotError as exc:
        codes = {"unavailable": EXIT_UNAVAILABLE, "bad_request": EXIT_USAGE}
        fail(exc.message, codes.get(exc.code, EXIT_FAILED))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (OSError, ConnectionError) as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_UNAVAILABLE)


async def _connect(config: Config) -> Client:
    url = bus.local_url(config)
    if url is None:
        fail("no NATS server: set TUXPILOT_NATS_URL or nats.url, or start `tuxpilot up`", EXIT_UNAVAILABLE)
    try:
        return await bus.connect(bus.local_nats(config), url, name="tuxpilot-cli")
    except Exception as exc:
        fail(f"cannot connect to {url}: {exc}", EXIT_UNAVAILABLE)


# -- rendering -----------------------------------------------------------------------------------


def describe(subject: str, data: bytes) -> str:
    """One line for an event, proposal or result seen on the bus."""
    try:
        doc = json.loads(data)
    except ValueError:
        return f"{subject} (not JSON, {len(data)} bytes)"
    if not isinstance(doc, dict):
        return f"{subject} {doc!r}"[:300]
    at = datetime.now().strftime("%H:%M:%S")
    kind = subject.split(".")[1] if subject.count(".") >= 1 else "?"
    if kind == "evt":
        figures = " ".join(f"{k}={doc[k]}" for k in ("value", "threshold", "resource") if doc.get(k) is not None)
        return f"{at} [cyan]event[/]    {doc.get('host')} {doc.get('type')} {doc.get('severity')} {figures}"
    if kind == "proposal":
        acts = ", ".join(f"{a.get('plugin')}.{a.get('action')}" for a in doc.get("actions") or [])
        return f"{at} [yellow]proposal[/] {doc.get('plugin')} → {acts} (event {str(doc.get('event_id'))[:8]})"
    if kind == "result":
        colour = "green" if doc.get("status") == "ok" else "red"
        why = f" {doc['reason']}" if doc.get("reason") else ""
        ms = f" {doc['duration_ms']:.0f} ms" if isinstance(doc.get("duration_ms"), int | float) else ""
        msg = f" — {doc['message']}" if doc.get("message") else ""
        return (
            f"{at} [{colour}]result[/]   {doc.get('plugin')}.{doc.get('action')} "
            f"[{colour}]{doc.get('status')}[/]{why}{ms}{msg}"
        )
    return f"{at} {subject} {json.dumps(doc)[:200]}"


async def _follow(nc: Client, subjects: list[str], count: int | None, as_json: bool) -> None:
    done = asyncio.Event()
    seen = 0

    async def show(msg: Any) -> None:
        nonlocal seen
        if as_json:
            out.print(msg.data.decode(errors="replace"), markup=False)
        else:
            out.print(describe(msg.subject, msg.data))
        seen += 1
        if count is not None and seen >= count:
            done.set()

    for subject in subjects:
        await nc.subscribe(subject, cb=show)
    await nc.flush()
    await done.wait()


# -- commands ------------------------------------------------------------------------------------


@app.command()
def up(ctx: typer.Context, quiet: Annotated[bool, typer.Option(help="Do not print the bus traffic.")] = False) -> None:
    """Start nats-server (unless TUXPILOT_NATS_URL is set), the agent and the local plugins; Ctrl-C stops all."""
    config = _config(ctx)

    async def main() -> None:
        agent = Agent(config, embedded=True)
        ready = asyncio.Event()
        runner = asyncio.create_task(agent.run(ready))
        await asyncio.wait([runner, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            await runner  # start failed: raise its error
            return
        out.print(f"TuxPilot {__version__} up on [bold]{agent.url}[/] as host [bold]{config.host_id}[/]")
        sys.stdout.flush()
        if not quiet and agent.nc is not None:
            s = agent.subjects
            for subject in (s.events(host=s.host), s.proposal(), s.results(s.host)):
                await agent.nc.subscribe(subject, cb=_print_msg)
        await runner

    _run(main())


async def _print_msg(msg: Any) -> None:
    out.print(describe(msg.subject, msg.data))
    sys.stdout.flush()


@app.command()
def agent(ctx: typer.Context) -> None:
    """Run the agent (gate, monitor, local plugins) against the configured NATS server."""
    config = _config(ctx)
    if bus.local_url(config) is None:
        fail("config key nats.url: the agent needs a server (TUXPILOT_NATS_URL); `tuxpilot up` embeds one", 2)
    _run(Agent(config, embedded=False).run())


@app.command()
def call(
    ctx: typer.Context,
    host: str,
    plugin: str,
    action: str,
    params: Annotated[str, typer.Argument(help="JSON object of params.")] = "{}",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 10.0,
) -> None:
    """Call an action directly, as `nats req tuxpilot.act.HOST.PLUGIN.ACTION PARAMS` would."""
    config = _config(ctx)
    subjects = bus.Subjects.of(config)

    async def main() -> int:
        nc = await _connect(config)
        try:
            try:
                msg = await nc.request(subjects.act(plugin, action, host), params.encode(), timeout=timeout)
            except NoRespondersError:
                known = await _actions_of(nc, subjects, host, plugin)
                hint = f"; {plugin} on {host} has: {', '.join(known)}" if known else f"; is {plugin} running on {host}?"
                fail(f"no responders for {plugin}.{action} on {host}{hint}", EXIT_UNAVAILABLE)
            except NatsTimeout:
                fail(f"no reply within {timeout} s", EXIT_TIMEOUT)
            out.print_json(msg.data.decode(errors="replace"))
            return EXIT_FAILED if (msg.headers or {}).get("Nats-Service-Error-Code") else 0
        finally:
            await nc.close()

    raise typer.Exit(_run(main()))


async def _actions_of(nc: Client, subjects: bus.Subjects, host: str, plugin: str) -> list[str]:
    try:
        kv = await open_bucket(nc.jetstream(), subjects)
        entry = await kv.get(f"{host}.{plugin}")
        return sorted(json.loads(entry.value or b"{}")["manifest"].get("actions", {}))
    except Exception:
        return []


@app.command()
def status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """The connection to the bus, the streams, registered and running plugins, consumer backlogs."""
    from agent.status import snapshot

    config = _config(ctx)

    async def main() -> dict[str, Any]:
        nc = await _connect(config)
        try:
            return await snapshot(nc, bus.Subjects.of(config))
        finally:
            await nc.close()

    state: dict[str, Any] = _run(main())
    if as_json:
        out.print_json(json.dumps(state))
        return
    server = state["server"]
    out.print(
        f"[green]connected[/] to {state['url']} ({server['name']}, nats-server {server['version']}, "
        f"JetStream {'on' if server['jetstream'] else 'off'}), round trip {state['rtt_ms']:.1f} ms"
    )
    table = Table("stream", "messages", "bytes")
    for name, figures in state["streams"].items():
        table.add_row(name, str(figures.get("messages", "-")), str(figures.get("bytes", figures.get("error", ""))))
    out.print(table)
    table = Table("consumer", "stream", "pending", "ack pending", "redelivered")
    for c in state["consumers"]:
        table.add_row(c["name"], c["stream"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"]))
    out.print(table)
    table = Table("plugin (host.name)", "version", "running instances", "running as")
    for key, version in sorted(state["registered"].items()):
        host, name = key.split(".", 1)
        instances = [r for r in state["running"] if r["plugin"] == name and r["host"] == host]
        users = sorted({str(r.get("user") or "?") for r in instances})
        table.add_row(key, str(version), str(len(instances)), ", ".join(users))
    out.print(table)


@app.command()
def audit(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Host id, or * for all.")] = "*",
    plugin: Annotated[str, typer.Option(help="Plugin, or * for all.")] = "*",
    action: Annotated[str, typer.Option(help="Action, or * for all.")] = "*",
    status: Annotated[str | None, typer.Option(help="ok, error, refused, suppressed, dry_run, timeout, …")] = None,
    since: Annotated[str | None, typer.Option(help="30s, 10m, 2h, 1d ago, or an ISO time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (the newest).")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """The audit trail: every gate decision and action outcome, from the audit stream."""
    from agent import audit as audit_trail

    config = _config(ctx)

    async def main() -> list[dict[str, Any]]:
        start = audit_trail.parse_since(since) if since else None
        nc = await _connect(config)
        try:
            return await audit_trail.read(
                nc, bus.Subjects.of(config), host=host, plugin=plugin, action=action, status=status,
                since=start, limit=limit,
            )
        finally:
            await nc.close()

    records: list[dict[str, Any]] = _run(main())
    if as_json:
        out.print_json(json.dumps(records))
        return
    table = Table("time", "host", "plugin.action", "status", "reason", "ms", "message")
    for r in records:
        ms = r.get("duration_ms")
        table.add_row(
            str(r.get("time", ""))[:19], str(r.get("host", "")), f"{r.get('plugin')}.{r.get('action')}",
            str(r.get("status")), str(r.get("reason") or ""), f"{ms:.0f}" if isinstance(ms, int | float) else "",
            str(r.get("message") or "")[:80],
        )
    out.print(table)


@plugin_app.command("list")
def plugin_list(
    ctx: typer.Context,
    live: Annotated[bool, typer.Option(help="Also ask the bus which instances are running.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The installed plugins (built-in and in plugin_dirs), with their actions and permissions."""
    config = _config(ctx)
    try:
        found = discover(plugin_dirs(config))
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    running: dict[str, int] = {}
    if live:

        async def ping() -> None:
            nc = await _connect(config)
            for inst in await live_instances(nc, config.host_id):
                running[inst["name"]] = running.get(inst["name"], 0) + 1
            await nc.close()

        _run(ping())
    rows: list[dict[str, Any]] = []
    for name, (folder, m) in sorted(found.items()):
        granted = sorted(p.value for p in config.plugin(name).granted(m))
        rows.append(
            {
                "name": name,
                "version": m.version,
                "category": m.category,
                "runtime": m.runtime,
                "actions": sorted(m.actions),
                "permissions": [p.value for p in m.permissions],
                "granted": granted,
                "path": str(folder),
                **({"running": running.get(name, 0)} if live else {}),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("plugin", "version", "category", "runtime", "actions", "granted", *(["running"] if live else []))
    for r in rows:
        extra = [str(r["running"])] if live else []
        cells = [r["name"], r["version"], r["category"], r["runtime"], ", ".join(r["actions"]), ", ".join(r["granted"])]
        table.add_row(*cells, *extra)
    out.print(table)


def _grant(ctx: typer.Context, name: str, permissions: list[str], *, revoke: bool) -> None:
    from agent.config import config_path, default_config_path, edit_grants
    from agent.manifest import Permission

    config = _config(ctx)
    found = discover(plugin_dirs(config))
    if name not in found:
        fail(f"no plugin named {name!r} (installed: {', '.join(sorted(found)) or 'none'})", EXIT_USAGE)
    try:
        chosen = [Permission(p) for p in permissions]
    except ValueError as exc:
        fail(f"{exc}; permissions are {', '.join(p.value for p in Permission)}", EXIT_USAGE)
    manifest = found[name][1]
    path = config_path(ctx.find_root().params.get("config")) or default_config_path()
    current = config.plugin(name).granted(manifest)
    try:
        granted = edit_grants(path, manifest, current, add=[] if revoke else chosen, remove=chosen if revoke else [])
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    out.print(f"{name}: granted {', '.join(p.value for p in granted) or 'nothing'} (in {path})")


@plugin_app.command("grant")
def plugin_grant(ctx: typer.Context, name: str, permissions: list[str]) -> None:
    """Grant a plugin permissions its manifest asks for (written to the host config; a running agent reloads it)."""
    _grant(ctx, name, permissions, revoke=False)


@plugin_app.command("revoke")
def plugin_revoke(ctx: typer.Context, name: str, permissions: list[str]) -> None:
    """Take permissions back from a plugin."""
    _grant(ctx, name, permissions, revoke=True)


@auth_app.command("show")
def auth_show(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """For each generated NATS user, what it may publish and subscribe to."""
    from agent import auth

    config = _config(ctx)
    users = auth.users_for(bus.Subjects.of(config), {n: m for n, (_, m) in _local(config).items()})
    if as_json:
        out.print_json(json.dumps(auth.describe(users)))
        return
    for u in users:
        replies = ", may reply to requests" if u.allow_responses else ""
        out.print(f"[bold]{u.name}[/] ({u.role}{replies})")
        out.print("  may publish:   " + "\n                 ".join(u.publish), markup=False)
        out.print("  may subscribe: " + "\n                 ".join(u.subscribe), markup=False)


@auth_app.command("export")
def auth_export(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the server-config snippet.")] = Path(
        "tuxpilot-auth.conf"
    ),
) -> None:
    """Write the `authorization` block for an external nats-server, and each user's credential file."""
    from agent import auth

    config = _config(ctx)
    users = auth.users_for(bus.Subjects.of(config), {n: m for n, (_, m) in _local(config).items()})
    hashes = auth.provision(config.state_dir, users, url=config.nats.url)
    output.write_text(auth.server_config(users, hashes))
    out.print(f"wrote {output}: include it in the server config (`include {output.name}`)")
    for u in users:
        out.print(f"  {u.role:8} {u.name}: {auth.credential_file(config.state_dir, u.name)}")


def _local(config: Config) -> dict[str, Any]:
    from agent.app import local_plugins

    try:
        return local_plugins(config)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)


@plugin_app.command("run")
def plugin_run(ctx: typer.Context, path: Path) -> None:
    """Run the Python plugin in folder PATH against the configured (or local `up`) server."""
    from agent.sdk import load_plugin

    config = _config(ctx)
    try:
        plugin = load_plugin(path.resolve())
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    _run(plugin.main(config))


@event_app.command("emit")
def event_emit(
    ctx: typer.Context,
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="category.name, e.g. memory.high")],
    value: Annotated[float | None, typer.Option(help="The reading.")] = None,
    host: Annotated[str | None, typer.Option(help="Host id (default: this host).")] = None,
    severity: Annotated[str, typer.Option(help="info, warning or critical.")] = "warning",
    resource: Annotated[str | None, typer.Option(help="What it is about (a mountpoint, a container).")] = None,
    threshold: Annotated[float | None, typer.Option(help="The threshold crossed.")] = None,
    ttl: Annotated[float | None, typer.Option(help="Seconds during which acting on it makes sense.")] = None,
) -> None:
    """Publish one test event, as the monitor would."""
    config = _config(ctx)
    subjects = bus.Subjects.of(config)
    try:
        event = Event.model_validate(
            {
                "id": new_id(),
                "time": now(),
                "type": event_type,
                "host": host or config.host_id,
                "value": value,
                "severity": severity,
                "resource": resource,
                "threshold": threshold,
                "ttl": ttl,
                "source": "cli",
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"invalid event: {'.'.join(map(str, first['loc']))}: {first['msg']}", EXIT_USAGE)

    async def main() -> None:
        nc = await _connect(config)
        await bus.publish_event(nc, subjects, event)
        await nc.flush()
        await nc.close()

    _run(main())
    out.print_json(event.to_json().decode())


@events_app.command("tail")
def events_tail(
    ctx: typer.Context,
    pattern: Annotated[str, typer.Argument(help="category.name with * wildcards, or > for all.")] = ">",
    host: Annotated[str, typer.Option(help="Host id, or * for every host.")] = "*",
    results: Annotated[bool, typer.Option(help="Also show proposals and results.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after this many messages.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each message's JSON.")] = False,
) -> None:
    """Follow events on the bus (Ctrl-C stops)."""
    config = _config(ctx)
    subjects = bus.Subjects.of(config)

    async def main() -> None:
        nc = await _connect(config)
        watch = [subjects.events(pattern, host=host)]
        if results:
            watch += [subjects.proposal(host), subjects.results(host)]
        try:
            await _follow(nc, watch, count, as_json)
        finally:
            await nc.close()

    _run(main())


@app.command()
def bench(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(min=1, help="Events per run (after the warm-up).")] = 20_000,
    in_flight: Annotated[int, typer.Option("--in-flight", min=1, help="Events in flight at once.")] = 64,
    warmup: Annotated[int, typer.Option(min=0, help="Events sent first, not counted.")] = 1_000,
    server: Annotated[str | None, typer.Option(help="Use this NATS server instead of an embedded one.")] = None,
    idle: Annotated[bool, typer.Option(help="Also measure the agent's CPU while idle (30 s).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure the pipeline (gate and a real plugin process) against the bare bus, and the agent's footprint."""
    from agent import bench as benchmark  # only this command pays for importing it

    config = _config(ctx)
    raise typer.Exit(
        benchmark.main(config, events=events, in_flight=in_flight, warmup=warmup, server=server, idle=idle,
                       as_json=as_json)
    )


@schema_app.command("list")
def schema_list() -> None:
    """The schemas TuxPilot ships."""
    table = Table("schema", "$id", "title")
    for name in schemas.SCHEMA_NAMES:
        doc = schemas.load(name)
        table.add_row(name, doc["$id"], doc.get("title", ""))
    out.print(table)


@schema_app.command("show")
def schema_show(name: str) -> None:
    """Print one schema's JSON."""
    try:
        doc = schemas.load(name)
    except KeyError as exc:
        fail(str(exc.args[0]), EXIT_USAGE)
    out.print_json(json.dumps(doc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
