"""Reading the audit trail: the gate's records in the audit stream, filtered like an operator asks."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout

from tuxpilot.protocol.errors import BadRequest, TuxPilotError
from tuxpilot.protocol.models import Status, now
from tuxpilot.protocol.names import Names, Subjects

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str) -> datetime:
    """`30s`, `10m`, `2h`, `1d` ago, or an ISO 8601 time (with a zone)."""
    m = _AGO.match(text.strip())
    if m:
        return now() - timedelta(**{_UNIT[m.group(2)]: float(m.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"--since {text!r}: give 30s, 10m, 2h, 1d or an ISO time") from None
    if when.tzinfo is None:
        raise BadRequest(f"--since {text!r}: an ISO time needs a zone, e.g. {text}Z")
    return when


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
# Records asked of the server at once, and how long one batch may take to arrive.
BATCH = 1000
BATCH_TIMEOUT_S = 5.0


def check_filters(status: str | None) -> None:
    """Refuse a filter that can never match, instead of answering an empty trail."""
    if status is not None and status not in STATUSES:
        raise BadRequest(f"--status {status!r}: one of {', '.join(STATUSES)}")


async def read(
    nc: Client,
    subjects: Subjects,
    *,
    host: str = "*",
    plugin: str = "*",
    action: str = "*",
    status: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The newest `limit` records matching the filters, oldest first.

    Read with batched direct gets (nats-server 2.11+), not a consumer: reading needs no right to
    create consumers, which operators do not have (a consumer "create" can update any durable, the
    gate's included). Exact: batches are read until the server says none is left.
    """
    check_filters(status)
    subject = f"{subjects.prefix}.result.{host}.{plugin}.{action}"
    records: list[dict[str, Any]] = []
    async for body in read_stream(nc, Names.of(subjects).audit, subject, since=since):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and (status is None or doc.get("status") == status):
            records.append(doc)
            if len(records) > limit:
                records.pop(0)
    return records


async def read_stream(nc: Client, stream: str, subject: str, *, since: datetime | None = None,
                      ) -> AsyncIterator[bytes]:
    """Every message body `stream` holds on `subject` (wildcards allowed), from `since` (or the first),
    oldest first: batched direct gets until the server says none is left."""
    request: dict[str, Any] = {"batch": BATCH, "next_by_subj": subject}
    if since is not None:
        request["start_time"] = since.isoformat()
    else:
        request["seq"] = 1
    while True:
        batch, last_seq, pending = await _batch(nc, stream, request)
        for body in batch:
            yield body
        if not batch or not pending:
            return
        request = {"batch": BATCH, "next_by_subj": subject, "seq": last_seq + 1}


async def _batch(nc: Client, stream: str, request: dict[str, Any]) -> tuple[list[bytes], int, int]:
    """One batch of a direct get: the bodies, the last sequence read and how many matching are left."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    bodies: list[bytes] = []
    last_seq = 0
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        deadline = asyncio.get_running_loop().time() + BATCH_TIMEOUT_S
        while True:
            msg = await sub.next_msg(timeout=max(0.01, deadline - asyncio.get_running_loop().time()))
            headers = msg.headers or {}
            code = headers.get("Status")
            if code == "404":  # nothing (more) matches
                return bodies, last_seq, 0
            if code == "204":  # end of this batch
                return bodies, int(headers.get("Nats-Last-Sequence") or last_seq), int(
                    headers.get("Nats-Num-Pending") or 0
                )
            if code is not None:
                raise TuxPilotError(f"reading {stream}: {code} {headers.get('Description', '')}".strip())
            bodies.append(msg.data)
            last_seq = int(headers.get("Nats-Sequence") or last_seq)
    except (TimeoutError, NatsTimeout):
        raise TuxPilotError(f"reading {stream}: no answer within {BATCH_TIMEOUT_S} s", code="unavailable") from None
    finally:
        await sub.unsubscribe()
