"""`tuxpilot plugin new | test | dev`: the plugin development kit's commands (the library is tuxpilot.pdk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tuxpilot.cli.common import EXIT_FAILED, EXIT_USAGE, config_of, err, fail, out, run_async
from tuxpilot.protocol.errors import ConfigError, TuxPilotError


def plugin_new(
    name: Annotated[str, typer.Argument(help="The plugin's name: a-z, 0-9, '_' and '-'.")],
    runtime: Annotated[str, typer.Option(help="python, javascript or wasm.")] = "python",
    category: Annotated[str, typer.Option(help="monitoring, integration, automation, security, development, cloud, "
                                          "networking, storage, virtualization or custom.")] = "custom",
    directory: Annotated[Path, typer.Option("--dir", help="Where the plugin's folder NAME is made.")] = Path("."),
    event: Annotated[str, typer.Option(help="The event type its handler subscribes to.")] = "memory.high",
    description: Annotated[str | None, typer.Option(help="One line for the manifest.")] = None,
) -> None:
    """Scaffold a working plugin: manifest, one event handler and one action, a test, and its build files.

    It passes `tuxpilot plugin test` as it is."""
    from tuxpilot.pdk import scaffold

    folder = directory / name
    try:
        made = scaffold.new(name, runtime=runtime, category=category, folder=folder, event=event,
                            description=description)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    out.print(f"created {made.folder} ({made.runtime})", markup=False)
    for path in made.files:
        if not path.startswith("sdk/"):
            out.print(f"  {path}", markup=False)
    if any(p.startswith("sdk/") for p in made.files):
        out.print("  sdk/  (a copy of the JavaScript SDK; package.json depends on it as file:./sdk)", markup=False)
    for note in made.notes:
        err.print(f"note: {note}", markup=False)
    out.print(f"next: tuxpilot plugin test {folder}   then: tuxpilot plugin dev {folder}", markup=False)


def plugin_test(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The plugin's folder.")],
    replay: Annotated[str | None, typer.Option(help="Instead: replay the events of this long ago (24h, 30m) "
                                               "or since an ISO time, in shadow mode.")] = None,
    server: Annotated[str | None, typer.Option(help="With --replay: the fleet's NATS URL (default: the "
                                               "configured or local one).")] = None,
    own: Annotated[bool, typer.Option(help="Run the plugin's own tests first.")] = True,
    call_permitted: Annotated[bool, typer.Option(help="Also call actions that need a permission with valid params "
                                                 "(they may change this host).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the agent's and the plugin's logs.")] = False,
) -> None:
    """Run the plugin's own tests, then check it against its own manifest on an embedded server and agent.

    With --replay, replay the events a fleet stored since then through this version of the plugin, nothing
    executed, and show its proposals against what the audit trail recorded, per event type."""
    from tuxpilot.log import setup as setup_logging

    folder = path.resolve()
    if not folder.is_dir():
        fail(f"{path} is not a folder", EXIT_USAGE)
    setup_logging("info" if verbose else "error", "console")
    if replay is not None:
        _replay(ctx, folder, replay, server, as_json=as_json, verbose=verbose)
        return
    if server is not None:
        fail("--server goes with --replay", EXIT_USAGE)
    from tuxpilot.pdk import check, owntests

    ok = True
    doc: dict[str, Any] = {}
    if own:
        try:
            tests = owntests.own_tests(folder, echo=None if as_json else lambda line: out.print(line, markup=False))
        except ConfigError as exc:
            fail(exc.message, EXIT_USAGE)
        doc["own_tests"] = {"ran": tests.ran, "ok": tests.ok, "note": tests.note, "output": tests.output[-4000:]}
        if not as_json:
            _print_own(tests)
        ok = tests.ok
        if not ok:
            if as_json:
                out.print_json(json.dumps(doc))
            raise typer.Exit(EXIT_FAILED)
    if not as_json:
        out.print("conformance: the plugin on an embedded server and agent, against its manifest", markup=False)
    try:
        report = run_async(check.check(folder, call_permitted=call_permitted, verbose=verbose))
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    doc["conformance"] = [vars(f) for f in report.findings]
    doc["passed"] = ok and report.passed
    if as_json:
        out.print_json(json.dumps(doc))
    else:
        for f in report.findings:
            mark = "skip" if f.skipped else "ok  " if f.ok else "FAIL"
            out.print(f"  {mark} {f.check}{': ' + f.detail if f.detail else ''}", markup=False)
        failed = sum(not f.ok for f in report.findings)
        out.print(f"{report.plugin}: {len(report.findings) - failed} of {len(report.findings)} checks passed"
                  + ("" if report.passed else f", {failed} failed"), markup=False)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)


def _print_own(tests: Any) -> None:
    lines = tests.output.splitlines()
    shown = lines[-40:] if not tests.ok else lines[-3:]
    for line in shown:
        out.print(f"  {line}", markup=False)
    if not tests.ok:
        out.print(f"own tests: FAILED ({tests.ran[-1] if tests.ran else 'not run'})", markup=False)
    elif tests.note:
        out.print(f"own tests: {tests.note}", markup=False)
    elif tests.ran:
        out.print("own tests: passed", markup=False)


def _replay(ctx: typer.Context, folder: Path, since: str, server: str | None, *, as_json: bool,
            verbose: bool) -> None:
    from tuxpilot.agent.audit import parse_since
    from tuxpilot.cli.common import connect
    from tuxpilot.pdk import replay
    from tuxpilot.protocol.names import Subjects

    config = config_of(ctx)
    try:
        start = parse_since(since)
    except TuxPilotError as exc:
        fail(exc.message.replace("--since", "--replay"), EXIT_USAGE)
    if server is not None:
        config = config.model_copy(update={"nats": config.nats.model_copy(update={"url": server})})

    async def main() -> replay.ReplayResult:
        fleet = await connect(config, name="tuxpilot-replay")
        try:
            return await replay.replay(fleet, Subjects.of(config), folder, start, verbose=verbose,
                                       echo=None if as_json else lambda line: err.print(line, markup=False))
        finally:
            await fleet.close()

    result = run_async(main())
    if as_json:
        out.print_json(json.dumps(result.to_doc()))
    else:
        for line in replay.render(result):
            out.print(line, markup=False)


def plugin_dev(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The plugin's folder.")],
    emit: Annotated[str | None, typer.Option(help="An event type to publish once the plugin serves, and "
                                             "again after each restart, e.g. memory.high.")] = None,
    data: Annotated[str | None, typer.Option(help="With --emit: the event's data, a JSON object.")] = None,
    value: Annotated[float | None, typer.Option(help="With --emit: the event's value.")] = None,
    resource: Annotated[str | None, typer.Option(help="With --emit: the event's resource.")] = None,
    embedded: Annotated[bool | None, typer.Option("--embedded/--local", help="Run on an embedded server and agent "
                                                  "started here, or only on the local `tuxpilot up` (default: "
                                                  "the local one when it answers, else embedded).")] = None,
) -> None:
    """Run the plugin against a real gate and restart it whenever a file of its folder changes.

    Its events, proposals, the gate's decisions and results, and its own log lines show in one view;
    Ctrl-C stops it (and an embedded server and agent started for it)."""
    import asyncio
    import signal

    from tuxpilot.cli.render import describe
    from tuxpilot.log import setup as setup_logging
    from tuxpilot.pdk import dev

    config = config_of(ctx)
    folder = path.resolve()
    if not folder.is_dir():
        fail(f"{path} is not a folder", EXIT_USAGE)
    try:
        doc = json.loads(data) if data is not None else {}
    except ValueError as exc:
        fail(f"--data is not JSON: {exc}", EXIT_USAGE)
    if not isinstance(doc, dict):
        fail("--data must be a JSON object", EXIT_USAGE)
    if emit is None and (data is not None or value is not None or resource is not None):
        fail("--data, --value and --resource go with --emit", EXIT_USAGE)
    if emit is not None:
        from tuxpilot.protocol.models import Event

        try:
            Event.new(emit, config.host_id)
        except ValueError:
            fail(f"--emit {emit!r}: an event type is <category>.<name>, e.g. memory.high", EXIT_USAGE)
    setup_logging("warning", config.log.format)

    def show(kind: str, text: str) -> None:
        if kind in ("event", "proposal", "result"):
            subject, _, body = text.partition(" ")
            out.print(_describe(kind, subject, body.encode(), describe))
        else:
            out.print(f"{'dev ' if kind == 'dev' else 'log '} {text}", markup=False,
                      style="bold" if kind == "dev" else "dim")

    loop_ = dev.DevLoop(folder, show, emit=dev.Emit(emit, doc, value, resource) if emit is not None else None)

    async def main() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, stop.set)
        await loop_.run(config, stop, use_embedded=embedded)
        out.print("dev  stopped", markup=False, style="bold")
        if loop_.failed:
            raise typer.Exit(1)

    run_async(main())


def _describe(kind: str, subject: str, body: bytes, describe: Any) -> str:
    """A view line: the proposal with each action's params (what an author changes), else the usual line."""
    import contextlib
    from datetime import datetime

    from rich.markup import escape

    if kind == "proposal":
        try:
            doc = json.loads(body)
            acts = "; ".join(f"{a.get('action')} {json.dumps(a.get('params') or {}, separators=(',', ':'))}"
                             for a in doc.get("actions") or [])
            at = datetime.now().strftime("%H:%M:%S")
            return f"{at} [yellow]proposal[/] " + escape(f"{acts} (event {str(doc.get('event_id'))[:8]})")
        except (ValueError, AttributeError):
            pass
    line = str(describe(subject, body))
    if kind == "result":
        with contextlib.suppress(ValueError, AttributeError):
            data = json.loads(body).get("data")
            if data is not None:
                line += " " + escape(json.dumps(data, separators=(",", ":"))[:300])
    return line
