"""`tuxpilot fleet`: create a fleet (operator mode), enrol and revoke hosts, join a host to it."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import nats
import typer
from nats.aio.client import Client

from tuxpilot.agent.config import write_private
from tuxpilot.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE, add_row, config_of, err, fail, out, run_async, table
from tuxpilot.fleet import admin, hub, leaf, member
from tuxpilot.fleet.heartbeat import HostStatus, judge, open_heartbeats, read_beat
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import default_config_path, subject_token

app = typer.Typer(help="A fleet of hosts on one NATS deployment (operator mode).", no_args_is_help=True)

CONNECT_WAIT_S = 10.0
FleetDir = Annotated[Path, typer.Option("--dir", "-d", help="The fleet's folder (its secrets: keep it private).")]


def _labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--label {item}: expected key=value", EXIT_USAGE)
        labels[key] = value
    return labels


async def _quiet(exc: Exception) -> None:
    """nats.py logs every failed attempt with a traceback by default; the caller says it once."""


async def _connect(fleet: admin.Fleet, creds: Path) -> Client:
    # nats.py reads max_reconnect_attempts=0 on a first connect as "try forever" (1 tries each server once,
    # measured: 2 s for a refused port), and the whole attempt is bounded too: no server means the change
    # waits in the configs, not a hang.
    return await asyncio.wait_for(
        nats.connect(fleet.urls, user_credentials=str(creds), allow_reconnect=False, max_reconnect_attempts=1,
                     connect_timeout=3, error_cb=_quiet), CONNECT_WAIT_S)


async def _push(folder: Path, fleet: admin.Fleet) -> bool:
    """Hand the servers the fleet account's new JWT; False when none answers (it is in the configs)."""
    try:
        nc = await _connect(fleet, folder / "sys.creds")
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        err.print(f"no server reached at {', '.join(fleet.urls)} ({type(exc).__name__}); the server config(s) in "
                  f"{folder} carry the change for the next start")
        return False
    try:
        answer = await admin.push(nc, fleet)
        out.print(f"account updated on the servers ({answer.get('data', {}).get('message', 'ok')})")
    finally:
        await nc.close()
    await _prepare(folder, fleet)
    return True


async def _prepare(folder: Path, fleet: admin.Fleet) -> None:
    """The hub's shared pieces that hosts may not make: the leases bucket, the audit's leaf sources."""
    try:
        nc = await _connect(fleet, folder / "admin.creds")
        try:
            leaves = await hub.prepare(nc, fleet)
        finally:
            await nc.close()
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        err.print(f"the hub's leases bucket and audit sources were not updated ({type(exc).__name__}: {exc})")
        return
    if leaves:
        out.print(f"the hub's audit sources the leaf host(s): {', '.join(leaves)}")


@app.command()
def init(
    folder: FleetDir = Path("fleet"),
    cluster: Annotated[int, typer.Option(help="Servers in a cluster (0: a single server).")] = 0,
    port: Annotated[int, typer.Option(help="Client port of the first server (the next ones follow).")] = 4222,
    cluster_port: Annotated[int, typer.Option(help="Route port of the first cluster node.")] = 6222,
    host: Annotated[str, typer.Option(help="Address the hosts reach the servers at.")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="The operator's and fleet account's name.")] = "tuxpilot",
    prefix: Annotated[str, typer.Option(help="Subject prefix of the fleet.")] = "tuxpilot",
    leaf_port: Annotated[int, typer.Option(help="Where the servers accept leaf hosts' servers (0: none).")] = 0,
) -> None:
    """Create the operator, the fleet and system accounts, the server config(s) and admin credentials."""
    count = cluster or 1
    ports = [port + i for i in range(count)]
    try:
        admin.init(folder, urls=[f"nats://{host}:{p}" for p in ports], name=name, prefix=prefix, ports=ports,
                   cluster_ports=[cluster_port + i for i in range(count)] if cluster else None,
                   leaf_port=leaf_port or None,
                   leaf_urls=[f"nats-leaf://{host}:{leaf_port + i}" for i in range(count)] if leaf_port else None)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    fleet = admin.load(folder)
    for path in admin.server_config_paths(folder, fleet):
        out.print(f"wrote {path}: start it with `nats-server -c {path}`")
    out.print(f"wrote {folder / 'admin.creds'} (every host's subjects) and {folder / 'sys.creds'} (account updates)")


@app.command()
def enroll(
    host: str,
    folder: FleetDir = Path("fleet"),
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="key=value, repeatable.")] = None,
    leaf: Annotated[bool, typer.Option("--leaf", help="HOST runs a leaf server of its own (works cut off).")]
    = False,
) -> None:
    """Give HOST its scoped signing keys and write its enrolment file; running servers learn it at once."""
    if subject_token(host) != host:
        fail(f"{host}: a host id is one subject token of [a-z0-9_-]", EXIT_USAGE)
    try:
        fleet, path = admin.enroll(folder, host, _labels(label or []), leaf=leaf)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    run_async(_push(folder, fleet))
    out.print(f"enrolled {host}: hand it {path} (secret), then run `tuxpilot fleet join FILE` there")


@app.command()
def revoke(host: str, folder: FleetDir = Path("fleet")) -> None:
    """Remove HOST's signing keys from the fleet account: its users are refused and their connections closed."""
    try:
        fleet = admin.revoke(folder, host)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    if not run_async(_push(folder, fleet)):
        raise typer.Exit(1)
    out.print(f"revoked {host}")


@app.command()
def join(
    ctx: typer.Context,
    enrollment: Annotated[Path, typer.Argument(help="The host's enrolment file from `fleet enroll`.")],
    config_file: Annotated[Path | None, typer.Option("--write", help="Host config to write (default: the usual).")]
    = None,
    leaf: Annotated[bool, typer.Option("--leaf", help="Write this host's leaf server config; the agent uses it.")]
    = False,
    leaf_listen: Annotated[int, typer.Option(help="Client port of the leaf server (with --leaf).")] = 4222,
) -> None:
    """Move this host into the fleet: keep its enrolment in the state dir, mint the agent's credential, and
    point the host config at the fleet's servers (no embedded server any more)."""
    config = config_of(ctx)
    try:
        doc = member.load_enrollment(enrollment)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    target = config_file or config.source or default_config_path()
    kept = config.state_dir / "fleet" / "enrollment.json"
    kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if enrollment.resolve() != kept.resolve():
        shutil.copyfile(enrollment, kept)
    kept.chmod(0o600)
    creds = member.write_creds(config.state_dir, doc, "agent")
    import tomlkit  # only this command writes TOML: the other commands (the daemon among them) skip it

    try:
        text = target.read_text() if target.exists() else ""
        document = tomlkit.parse(text)
    except (OSError, ValueError) as exc:
        fail(f"{target}: {exc}", EXIT_USAGE)
    document["host_id"] = doc.host
    document["subject_prefix"] = doc.prefix
    document["state_dir"] = str(config.state_dir)
    nats_table = document.setdefault("nats", tomlkit.table())
    nats_table["url"] = ",".join(doc.urls)
    if leaf:
        leaf_conf = _write_leaf(config.state_dir, doc, leaf_listen)
        nats_table["url"] = f"nats://127.0.0.1:{leaf_listen}"
        out.print(f"wrote {leaf_conf}: run this host's leaf server with `nats-server -c {leaf_conf}`")
    nats_table["creds"] = str(creds)
    for stale in ("user", "password", "user_file", "token"):
        nats_table.pop(stale, None)
    fleet_table = document.setdefault("fleet", tomlkit.table())
    fleet_table["enrollment"] = str(kept)
    fleet_table["labels"] = doc.labels
    target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, tomlkit.dumps(document))
    out.print(f"wrote {target}: host {doc.host} joins the fleet at {', '.join(doc.urls)} as {creds.name}")



def _write_leaf(state_dir: Path, doc: admin.Enrollment, port: int) -> Path:
    if doc.leaf is None:
        fail(f"{doc.host} was not enrolled as a leaf host: `tuxpilot fleet enroll {doc.host} --leaf` first", EXIT_USAGE)
    leaf_creds = member.write_creds(state_dir, doc, "leaf")
    path = state_dir / "fleet" / "leaf.conf"
    text = leaf.leaf_config(doc, leaf_creds, store_dir=state_dir / "leaf" / "jetstream", port=port)
    write_private(path, text)
    return path


@app.command()
def status(
    folder: FleetDir = Path("fleet"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    server: Annotated[str | None, typer.Option(help="Server URL(s), instead of the fleet's own.")] = None,
) -> None:
    """Every enrolled host: alive, lost (its heartbeat expired) or never seen; with its last beat."""
    try:
        fleet = admin.load(folder)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)

    async def main() -> list[HostStatus]:
        try:
            nc = await asyncio.wait_for(nats.connect(
                server.split(",") if server else fleet.urls, user_credentials=str(folder / "admin.creds"),
                allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3), 10)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            fail(f"no server reached at {server or ', '.join(fleet.urls)} ({type(exc).__name__})", EXIT_UNAVAILABLE)
        try:
            kv = await open_heartbeats(nc.jetstream(), Subjects(fleet.prefix, "admin"))
            return [judge(host, record.labels, await read_beat(kv, host))
                    for host, record in sorted(fleet.hosts.items()) if not record.revoked]
        finally:
            await nc.close()

    hosts: list[HostStatus] = run_async(main())
    if as_json:
        out.print_json(json.dumps([h.doc() for h in hosts]))
        return
    grid = table("host", "state", "labels", "version", "plugins", "last beat", "last error")
    now = time.time()
    for h in hosts:
        beat = h.beat
        add_row(grid, h.host, h.state, ",".join(f"{k}={v}" for k, v in sorted(h.labels.items())),
                beat.version if beat else "", ",".join(f"{p}:{s}" for p, s in sorted(beat.plugins.items())) if beat
                else "", f"{now - beat.at:.0f} s ago" if beat else "", (beat.last_error or "") if beat else "")
    out.print(grid)
    counts = {s: sum(h.state == s for h in hosts) for s in ("alive", "lost", "never seen")}
    out.print(", ".join(f"{n} {s}" for s, n in counts.items()))
