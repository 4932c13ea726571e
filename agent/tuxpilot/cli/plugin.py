"""`tuxpilot plugin`: list, grant, revoke, run."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import subprocess
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from tuxpilot.agent.app import host_plugins
from tuxpilot.agent.config import Config, handoff_timeout_s
from tuxpilot.bus.registry import instances_of
from tuxpilot.cli import install, market, pdk
from tuxpilot.cli.common import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_row,
    config_of,
    connect,
    err,
    fail,
    out,
    run_async,
    table,
)
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import NatsConfig, default_config_path, environment_of

app = typer.Typer(help="Plugins: list, run, develop (new, test, dev), package, publish, install.", no_args_is_help=True)
app.command("install")(install.plugin_install)
app.command("update")(install.plugin_update)
app.command("remove")(install.plugin_remove)
app.command("package")(market.plugin_package)
app.command("verify")(market.plugin_verify)
app.command("publish")(market.plugin_publish)
app.command("search")(market.plugin_search)
app.command("info")(market.plugin_info)
app.command("fetch")(market.plugin_fetch)


@app.command("list")
def plugin_list(
    ctx: typer.Context,
    live: Annotated[bool, typer.Option(help="Also ask the bus which instances are running.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The installed plugins (built-in and in plugin_dirs), their actions and permissions, and whether this
    host can run them (and why not)."""
    config = config_of(ctx)
    for folder in config.plugin_dirs:
        if not folder.is_dir():
            err.print(f"warning: plugin_dirs names {folder}, which is not a folder", markup=False)
    found = host_plugins(config)
    running: dict[str, int] = {}
    if live:

        async def ping() -> None:
            nc = await connect(config)
            try:
                for name in found.plugins:
                    running[name] = len(await instances_of(nc, name, config.host_id))
            finally:
                await nc.close()

        run_async(ping())
    rows: list[dict[str, Any]] = []
    for item in sorted([*found.plugins.values(), *found.skipped], key=lambda f: (f.name, str(f.folder))):
        m = item.manifest
        loaded = found.plugins.get(item.name) is item
        rows.append(
            {
                "name": item.name,
                "version": m.version if m else None,
                "category": m.category if m else None,
                "runtime": m.runtime if m else None,
                "actions": sorted(m.actions) if m else [],
                "permissions": [p.value for p in m.permissions] if m else [],
                "granted": sorted(p.value for p in config.plugin(item.name).granted(m)) if m and loaded else [],
                "path": str(item.folder),
                "runnable": item.runnable and loaded,
                "problem": item.problem,
                **({"running": running.get(item.name, 0) if loaded else 0} if live else {}),
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    # One name per line, so the table fits 80 columns (piped, or a narrow terminal) without cutting
    # an action's name; `--json` has every field.
    grid = table("plugin", "kind", "actions", "granted")
    for r in rows:
        about = [r["name"], r["version"] or "-", *([f"{r['running']} running"] if live else []),
                 *([] if r["runnable"] else ["NOT RUNNABLE"])]
        add_row(grid, "\n".join(about), f"{r['category'] or '-'}\n{r['runtime'] or '-'}", "\n".join(r["actions"]),
                "\n".join(r["granted"]))
    out.print(grid)
    # Why not, under the table: a reason names paths and would not fit a cell; wrapped to the width.
    for r in rows:
        if not r["runnable"]:
            out.print(f"{r['name']} ({r['path']}) is not runnable: {r['problem']}", markup=False, soft_wrap=False)


def _grant(ctx: typer.Context, name: str, permissions: list[str], *, revoke: bool) -> None:
    from tuxpilot.agent.config import edit_grants
    from tuxpilot.protocol.manifest import Permission
    from tuxpilot.settings import config_path

    config = config_of(ctx)
    found = {n: (f.folder, f.manifest) for n, f in host_plugins(config).plugins.items() if f.manifest is not None}
    if name not in found:
        fail(f"no plugin named {name!r} (installed: {', '.join(sorted(found)) or 'none'})", EXIT_USAGE)
    try:
        chosen = [Permission(p) for p in permissions]
    except ValueError as exc:
        fail(f"{exc}; permissions are {', '.join(p.value for p in Permission)}", EXIT_USAGE)
    manifest = found[name][1]
    path = config_path(ctx.find_root().params.get("config")) or default_config_path()
    current = config.plugin(name).granted(manifest)
    unchanged = [p for p in chosen if (p in current) != revoke]
    if unchanged and len(unchanged) == len(chosen):
        state = "was not granted" if revoke else "is already granted"
        now_granted = ", ".join(sorted(p.value for p in current)) or "nothing"
        out.print(f"{name}: {', '.join(p.value for p in unchanged)} {state}; nothing changed "
                  f"(granted: {now_granted}; {path} left as it was)", markup=False)
        return
    try:
        granted = edit_grants(path, manifest, current, add=[] if revoke else chosen, remove=chosen if revoke else [])
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    out.print(f"{name}: granted {', '.join(p.value for p in granted) or 'nothing'} (in {path})", markup=False)


@app.command("grant")
def plugin_grant(ctx: typer.Context, name: str, permissions: list[str]) -> None:
    """Grant a plugin permissions its manifest asks for (written to the host config; a running agent reloads it)."""
    _grant(ctx, name, permissions, revoke=False)


@app.command("revoke")
def plugin_revoke(ctx: typer.Context, name: str, permissions: list[str]) -> None:
    """Take permissions back from a plugin."""
    _grant(ctx, name, permissions, revoke=True)



@app.command("run")
def plugin_run(ctx: typer.Context, path: Path) -> None:
    """Run the plugin in folder PATH (Python or JavaScript) against the configured (or local `up`) server.

    Against a local `tuxpilot up`, the agent first loads the folder's manifest itself and gives the
    plugin a NATS user of its own (asked as the operator); with configured credentials, those are used.
    """
    from tuxpilot.protocol.manifest import load as load_manifest
    from tuxpilot.sdk.plugin import load_plugin
    from tuxpilot.sdk.settings import PluginProcessSettings

    config = config_of(ctx)
    folder = path.resolve()
    try:
        manifest = load_manifest(folder)
        if manifest.runtime == "container":
            # The container is made by the agent's plugin host (the hardening flags, the plugin's user, the relay
            # into a namespace of its own), which only an agent running as root on the engine's host can do.
            fail(f"{manifest.name} is a container plugin, which only the agent runs: name its folder in the host "
                 f"config's plugin_dirs, or `tuxpilot plugin package` it and `tuxpilot plugin install` the package",
                 EXIT_USAGE)
        if manifest.runtime == "javascript":
            _run_javascript(config, folder)
        plugin = load_plugin(folder)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    settings = PluginProcessSettings.of(config)

    async def main() -> None:
        settings.nats = await _plugin_credentials(config, folder)
        nc = await connect(settings, name=f"tuxpilot-plugin-{plugin.name}", credentials=settings.nats)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await plugin.start(nc, settings)
            where = nc.connected_url.geturl() if nc.connected_url else ""
            err.print(f"{plugin.name} {plugin.manifest.version} serving on {where} (Ctrl-C stops)", markup=False)
            await stop.wait()
        finally:
            await plugin.stop()
            with contextlib.suppress(Exception):
                await nc.drain()

    run_async(main())


def _run_javascript(config: Config, folder: Path) -> NoReturn:
    """`node` on the plugin's entry point, with the environment the agent's plugin host would give it
    (its manifest as JSON among it), after installing its dependencies from its lockfile."""
    import structlog

    from tuxpilot.bus import connect as bus
    from tuxpilot.protocol.manifest import load as load_manifest
    from tuxpilot.runtimes import javascript
    from tuxpilot.runtimes.host import PluginHost, launch_of
    from tuxpilot.runtimes.loader import plugin_path

    manifest = load_manifest(folder)
    runtime = javascript.JavaScript()
    refused = runtime.missing(folder, manifest, plugin_path())
    if refused is not None:
        fail(f"runtime javascript cannot run here: {refused}", EXIT_USAGE)
    url = bus.local_url(config)
    if url is None:
        fail("no NATS server: set TUXPILOT_NATS_URL or start `tuxpilot up`", EXIT_UNAVAILABLE)
    nats: NatsConfig = run_async(_plugin_credentials(config, folder))
    run_async(javascript.install(folder, structlog.get_logger("tuxpilot.plugin").bind(plugin=manifest.name)))
    host = PluginHost(config, url, {manifest.name: (folder, manifest)},
                      handoff_timeout_s=functools.partial(handoff_timeout_s, config))
    if nats.user_file is not None:
        host.credentials[manifest.name] = nats.user_file
    plugin = host.plugins[manifest.name]
    env = host.environment(plugin)
    env.update(environment_of(nats.model_copy(update={"url": url}), "nats"))
    err.print(f"{manifest.name} {manifest.version} (javascript) on {url} (Ctrl-C stops)", markup=False)
    proc = subprocess.Popen(launch_of(plugin).argv, env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # stop it the way we are stopped
    while True:
        try:
            raise typer.Exit(proc.wait())
        except KeyboardInterrupt:  # node got the same SIGINT from the terminal: let it stop cleanly
            continue


async def _plugin_credentials(config: Config, folder: Path) -> NatsConfig:
    """Who a plugin run by hand is on the bus: the configured credentials, else — against a local `up`
    with generated authorization — the user the agent makes for it once it has loaded the folder's
    manifest itself. Never the operator's: the operator may neither serve actions nor propose."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from tuxpilot.agent.handrun import LOAD_PLUGIN
    from tuxpilot.bus import connect as bus

    cfg = config.nats
    if cfg.user or cfg.user_file or cfg.creds or cfg.token:
        return cfg
    subjects = Subjects.of(config)
    nc = await connect(config)  # as the operator, who alone may ask the agent
    try:
        reply = await nc.request(
            subjects.agent_control(LOAD_PLUGIN), json.dumps({"folder": str(folder)}).encode(),
            timeout=cfg.request_timeout_s + cfg.connect_timeout_s,
        )
    except NoRespondersError:
        where = f"no agent for host {config.host_id} answers at {bus.local_url(config)}"
        if bus.local_nats(config).user_file is not None:
            fail(f"{where}: is `tuxpilot up` running?", EXIT_UNAVAILABLE)
        # A bare server (no authorization, no agent): the plugin can run, but no gate acts on its proposals.
        err.print(f"warning: {where}; the plugin runs, but no gate has loaded its manifest", markup=False)
        return cfg
    except NatsTimeout:
        fail(f"the agent did not answer within {cfg.request_timeout_s + cfg.connect_timeout_s:g} s", EXIT_TIMEOUT)
    finally:
        await nc.close()
    try:
        doc = json.loads(reply.data)
    except ValueError:
        fail("the agent's answer is not JSON", EXIT_FAILED)
    if "code" in doc:
        codes = {"bad_request": EXIT_USAGE, "invalid_config": EXIT_USAGE, "conflict": EXIT_USAGE,
                 "unavailable": EXIT_UNAVAILABLE}
        fail(f"the agent did not load {folder}: {doc.get('message')}", codes.get(doc["code"], EXIT_FAILED))
    user_file = doc.get("user_file")
    return cfg.model_copy(update={"user_file": Path(user_file)}) if user_file else cfg


app.command("new")(pdk.plugin_new)
app.command("test")(pdk.plugin_test)
app.command("dev")(pdk.plugin_dev)
