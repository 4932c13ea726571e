"""Rendering what the bus carries: one line per event, proposal or result."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

from nats.aio.client import Client
from rich.markup import escape

from tuxpilot.cli.common import out


def describe(subject: str, data: bytes) -> str:
    """One line (rich markup) for an event, proposal or result seen on the bus; what the message
    carries is escaped, so a `[...]` in it is shown, not taken as markup."""
    try:
        doc = json.loads(data)
    except ValueError:
        return escape(f"{subject} (not JSON, {len(data)} bytes)")
    if not isinstance(doc, dict):
        return escape(f"{subject} {doc!r}"[:300])
    at = datetime.now().strftime("%H:%M:%S")
    kind = subject.split(".")[1] if subject.count(".") >= 1 else "?"
    if kind == "evt":
        figures = " ".join(f"{k}={doc[k]}" for k in ("value", "threshold", "resource") if doc.get(k) is not None)
        what = f"{doc.get('host')} {doc.get('type')} {doc.get('severity')} {figures}"
        return f"{at} [cyan]event[/]    {escape(what)}"
    if kind == "proposal":
        proposed = [a for a in doc.get("actions") or [] if isinstance(a, dict)]
        acts = ", ".join(f"{a.get('plugin')}.{a.get('action')}" for a in proposed)
        return f"{at} [yellow]proposal[/] " + escape(
            f"{doc.get('plugin')} → {acts} (event {str(doc.get('event_id'))[:8]})"
        )
    if kind == "result":
        colour = "green" if doc.get("status") == "ok" else "red"
        why = f" {doc['reason']}" if doc.get("reason") else ""
        ms = f" {doc['duration_ms']:.0f} ms" if isinstance(doc.get("duration_ms"), int | float) else ""
        msg = f" — {doc['message']}" if doc.get("message") else ""
        what = escape(f"{doc.get('plugin')}.{doc.get('action')}")
        tail = escape(f"{why}{ms}{msg}")
        return f"{at} [{colour}]result[/]   {what} [{colour}]{escape(str(doc.get('status')))}[/]{tail}"
    return escape(f"{at} {subject} {json.dumps(doc)[:200]}")


async def follow(nc: Client, subjects: list[str], count: int | None, as_json: bool) -> None:
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
