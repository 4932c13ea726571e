"""`tuxpilot rules`, `schedule`, `approvals`, `approve` and `deny`: asked of the host's agent over NATS."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

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
from tuxpilot.protocol.names import Subjects

rules_app = typer.Typer(help="The host's rules: list them, test one on an event, explain the last events.",
                        no_args_is_help=True)
schedule_app = typer.Typer(help="The host's schedules: next run times, run one now.", no_args_is_help=True)

Host = Annotated[str | None, typer.Option("--host", help="The host whose agent to ask (default: this host).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the agent's JSON answer.")]


def _ask(ctx: typer.Context, subject_of: Any, body: dict[str, Any], timeout: float = 30.0) -> tuple[Any, bool]:
    """One request to the agent; returns (document, is_error). No agent: one line, exit 3."""
    config = config_of(ctx)
    subjects = Subjects.of(config)

    async def main() -> tuple[Any, bool]:
        nc = await connect(config)
        try:
            msg = await nc.request(subject_of(subjects), json.dumps(body).encode(), timeout=timeout)
        except NoRespondersError:
            fail(f"no agent answers on {subject_of(subjects)}: is `tuxpilot up` running there?", EXIT_UNAVAILABLE)
        except NatsTimeout:
            fail(f"no reply within {timeout:g} s", EXIT_TIMEOUT)
        finally:
            await nc.close()
        return json.loads(msg.data), bool((msg.headers or {}).get("Nats-Service-Error-Code"))

    doc, is_error = run_async(main())
    return doc, is_error


def _control(verb: str, host: str | None) -> Any:
    return lambda s: s.agent_control(verb, host)


def _failed(doc: Any) -> None:
    fail(str(doc.get("message", doc)) if isinstance(doc, dict) else str(doc),
         EXIT_USAGE if isinstance(doc, dict) and doc.get("code") == "bad_request" else EXIT_FAILED)


@rules_app.command("list")
def rules_list(ctx: typer.Context, host: Host = None, as_json: AsJson = False) -> None:
    """The rules in force, and those refused at load with the reason (a bad condition: line and column)."""
    doc, is_error = _ask(ctx, _control("rules", host), {"op": "list"})
    if is_error:
        _failed(doc)
    if as_json:
        out.print_json(json.dumps(doc))
        return
    grid = table("RULE", "EVENTS", "CONDITION", "ACTIONS", "THROTTLE")
    for rule in doc["rules"]:
        throttle = " ".join(filter(None, [f"once_within={rule['once_within']:g}s" if rule["once_within"] else "",
                                          f"max_per_hour={rule['max_per_hour']}" if rule["max_per_hour"] else ""]))
        add_row(grid, rule["name"], ", ".join(rule["events"]), rule["condition"],
                ", ".join(f"{a['plugin']}.{a['action']}" for a in rule["actions"]), throttle or "-")
    out.print(grid)
    for name, why in doc["refused"].items():
        out.print(f"REFUSED {name}: {why}", markup=False)


@rules_app.command("test")
def rules_test(
    ctx: typer.Context,
    rule: str,
    event: Annotated[str, typer.Option("--event", help='The event as JSON: {"type": "disk.low", "value": 97, ...}.')],
    host: Host = None,
) -> None:
    """Would RULE match this event, and what would it propose? Nothing is run."""
    try:
        doc_event = json.loads(event)
    except ValueError as exc:
        fail(f"--event is not JSON: {exc}", EXIT_USAGE)
    doc, is_error = _ask(ctx, _control("rules", host), {"op": "test", "rule": rule, "event": doc_event})
    if is_error:
        _failed(doc)
    out.print_json(json.dumps(doc))
    raise typer.Exit(0 if doc.get("matched") else EXIT_FAILED)


@rules_app.command("explain")
def rules_explain(ctx: typer.Context, last: Annotated[int, typer.Option(help="How many events.")] = 10,
                  host: Host = None, as_json: AsJson = False) -> None:
    """For the last events the agent saw: which rules matched, and why the others did not."""
    doc, is_error = _ask(ctx, _control("rules", host), {"op": "explain", "last": last})
    if is_error:
        _failed(doc)
    if as_json:
        out.print_json(json.dumps(doc))
        return
    for entry in doc["events"]:
        event = entry["event"]
        out.print(f"{event['time']}  {event['type']}  {event['id']}  value={event.get('value')} "
                  f"resource={event.get('resource')}", markup=False)
        for verdict in entry["verdicts"]:
            mark = "MATCH" if verdict["matched"] else "no   "
            out.print(f"  {mark} {verdict['rule']}: {verdict['why']}", markup=False)


@schedule_app.command("list")
def schedule_list(ctx: typer.Context, host: Host = None, as_json: AsJson = False) -> None:
    """The schedules in force with their next run times (in their time zone)."""
    doc, is_error = _ask(ctx, _control("schedules", host), {"op": "list"})
    if is_error:
        _failed(doc)
    if as_json:
        out.print_json(json.dumps(doc))
        return
    grid = table("SCHEDULE", "WHEN", "TZ", "ACTIONS", "NEXT RUNS")
    for s in doc["schedules"]:
        when = s["cron"] if s.get("cron") else f"every {s['every_s']:g} s"
        add_row(grid, s["name"], when, s["timezone"], ", ".join(f"{a['plugin']}.{a['action']}" for a in s["actions"]),
                " ".join(s["next_runs"]) or "-")
    out.print(grid)
    for name, why in doc["refused"].items():
        out.print(f"REFUSED {name}: {why}", markup=False)


@schedule_app.command("run")
def schedule_run(ctx: typer.Context, name: str, host: Host = None) -> None:
    """Run a schedule's actions now, through the gate (audited with the schedule as source)."""
    doc, is_error = _ask(ctx, _control("schedules", host), {"op": "run", "name": name}, timeout=120.0)
    if is_error:
        _failed(doc)
    out.print_json(json.dumps(doc))
    statuses = {r.get("status") for r in doc.get("results", [])}
    raise typer.Exit(0 if statuses <= {"ok", "pending"} else EXIT_FAILED)


def approvals(ctx: typer.Context, host: Host = None,
              every: Annotated[bool, typer.Option("--all", help="Decided and expired ones too.")] = False,
              as_json: AsJson = False) -> None:
    """What waits for approval on the host (`tuxpilot approve ID` / `tuxpilot deny ID`)."""
    doc, is_error = _ask(ctx, _control("approvals", host), {"all": every})
    if is_error:
        _failed(doc)
    if as_json:
        out.print_json(json.dumps(doc))
        return
    grid = table("ID", "STATE", "ACTION", "PARAMS", "PROPOSER", "WHY", "EXPIRES")
    for a in doc["approvals"]:
        add_row(grid, a["id"], a["state"], f"{a['plugin']}.{a['action']}", json.dumps(a.get("params", {})),
                f"{a['source']}:{a.get('proposer') or a.get('caller') or '-'}", a["why"], a["expires_at"])
    out.print(grid)


def _decide(ctx: typer.Context, approval_id: str, decision: str, comment: str | None, host: str | None) -> None:
    body: dict[str, Any] = {"decision": decision}
    if comment:
        body["comment"] = comment
    doc, is_error = _ask(ctx, lambda s: s.approve(approval_id, host), body, timeout=120.0)
    if is_error:
        _failed(doc)
    out.print_json(json.dumps(doc))
    done = doc.get("status") == "ok" if decision == "approve" else doc.get("reason") == "approval_denied"
    raise typer.Exit(0 if done else EXIT_FAILED)


Comment = Annotated[str | None, typer.Option("--comment", "-m", help="Kept in the approval and the audit.")]


def approve(ctx: typer.Context, approval_id: str, comment: Comment = None, host: Host = None) -> None:
    """Approve a held action: it goes through the gate again and runs once; prints its result."""
    _decide(ctx, approval_id, "approve", comment, host)


def deny(ctx: typer.Context, approval_id: str, comment: Comment = None, host: Host = None) -> None:
    """Deny a held action: recorded refused (approval_denied), never run."""
    _decide(ctx, approval_id, "deny", comment, host)
