"""Reading the audit trail: the gate's records in the audit stream, filtered like an operator asks."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any, get_args

from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from tuxpilot.protocol.errors import BadRequest
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


STATUSES: tuple[str, ...] = get_args(Status)
# Each message of the listing must arrive within this long once the server said it is there.
NEXT_MSG_TIMEOUT_S = 5.0


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

    Exact: the number of matching records is taken from the consumer right after it is created
    (delivered so far + still pending: the push consumer may have delivered some already, so
    `num_pending` alone can be 0 while records are on their way), and exactly that many are read.
    """
    check_filters(status)
    js = nc.jetstream()
    stream = Names.of(subjects).audit
    subject = f"{subjects.prefix}.result.{host}.{plugin}.{action}"
    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
    records: list[dict[str, Any]] = []
    try:
        info = await sub.consumer_info()
        expected = (info.delivered.consumer_seq if info.delivered else 0) + (info.num_pending or 0)
        for _ in range(expected):
            msg = await sub.next_msg(timeout=NEXT_MSG_TIMEOUT_S)
            try:
                doc = json.loads(msg.data)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and (status is None or doc.get("status") == status):
                records.append(doc)
                if len(records) > limit:
                    records.pop(0)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return records
