"""A fleet-wide call: one request on `P.fleet.act.<plugin>.<action>`, every targeted host's gate answers,
the replies gathered until a deadline (or until every host the roster expects has answered)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg

from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.names import FLEET_INBOX, HOST_HEADER, Subjects


@dataclass(frozen=True)
class HostReply:
    host: str
    status: str  # "ok", or the error code the gate or plugin answered
    ms: float
    summary: str  # the first line of the data, or the error's message
    body: bytes


def _summary(body: bytes, failed: bool) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").splitlines()[0][:120] if body else ""
    if failed and isinstance(doc, dict):
        inner = doc.get("error")
        error: dict[str, object] = inner if isinstance(inner, dict) else doc
        return str(error.get("message", ""))[:120]
    if isinstance(doc, dict) and "data" in doc:
        doc = doc["data"]
    text = json.dumps(doc, separators=(",", ":"))
    return text.splitlines()[0][:120] if text else ""


def parse_reply(msg: Msg, started: float) -> HostReply | None:
    headers = msg.headers or {}
    host = headers.get(HOST_HEADER)
    if not host:  # a no-responders status or a stray reply: not a host's answer
        return None
    code = headers.get("Nats-Service-Error-Code")
    status = "ok"
    if code:
        try:
            status = str(json.loads(msg.data).get("error", {}).get("code") or code)
        except (ValueError, AttributeError):
            status = code
    return HostReply(host, status, (time.perf_counter() - started) * 1000, _summary(msg.data, bool(code)), msg.data)


async def gather(nc: Client, subjects: Subjects, plugin: str, action: str, params: bytes, targets: Targets, *,
                 deadline_s: float, expected: set[str] | None = None) -> list[HostReply]:
    """Every reply that arrives within `deadline_s`; returns early once each `expected` host answered."""
    return await gather_on(nc, subjects.fleet_act(plugin, action), params, targets, deadline_s=deadline_s,
                           expected=expected)


async def gather_on(nc: Client, subject: str, body: bytes, targets: Targets, *, deadline_s: float,
                    expected: set[str] | None = None) -> list[HostReply]:
    """One request on a fan-out `subject` (a fleet-wide call, or a request to every targeted agent), and every
    host's reply within `deadline_s`; returns early once each `expected` host answered."""
    inbox = f"{FLEET_INBOX}.{secrets.token_hex(12)}"
    replies: dict[str, HostReply] = {}
    done = asyncio.Event()
    started = time.perf_counter()

    async def on_reply(msg: Msg) -> None:
        reply = parse_reply(msg, started)
        if reply is None or reply.host in replies:
            return
        replies[reply.host] = reply
        if expected is not None and expected <= replies.keys():
            done.set()

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, body, reply=inbox, headers=targets.headers() or None)
        await nc.flush()
        if expected is not None and not expected:
            return []
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), deadline_s)
    finally:
        await sub.unsubscribe()
    return sorted(replies.values(), key=lambda r: r.host)
