"""The registry bucket: where each host's plugin entries are kept (written by the agent only), and who
answers `$SRV.PING`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from tuxpilot.protocol.names import Names, Subjects
from tuxpilot.protocol.registry import Announcement


async def open_bucket(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> KeyValue:
    """The registry bucket, created on first use by whoever comes first (agent or plugin)."""
    name = Names.of(subjects).plugins
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=name, history=1, description="TuxPilot plugin manifests",
                                         replicas=replicas)


async def live_instances(
    nc: Client, host: str | None = None, wait: float = 0.3, *, subject: str = "$SRV.PING"
) -> list[dict[str, Any]]:
    """Every running plugin instance that answers `subject` (optionally only those of `host`).

    What an answer says of itself (name, host, pid) is the answerer's word: anyone allowed to answer
    `$SRV.PING` can claim any name. `instances_of` asks in a way the server vouches for.
    """
    inbox = nc.new_inbox()
    found: list[dict[str, Any]] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + wait
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except TimeoutError:
                break
            with contextlib.suppress(ValueError, AttributeError):
                ping = json.loads(msg.data)
                meta = ping.get("metadata") or {}
                # Plugins only: the gates' own service (`tuxpilot-gate`) answers the same ping.
                if Announcement.is_plugin(meta, host):
                    found.append(ping)
    finally:
        await sub.unsubscribe()
    return found


async def instances_of(nc: Client, plugin: str, host: str | None = None, wait: float = 0.3) -> list[dict[str, Any]]:
    """The instances of `plugin` that answer `$SRV.PING.<plugin>`. Under TuxPilot's generated
    authorization only that plugin's own NATS user may subscribe to it, so another plugin cannot answer
    here in its name (it can on the bare `$SRV.PING`)."""
    found = await live_instances(nc, host, wait, subject=f"$SRV.PING.{plugin}")
    return [p for p in found if p.get("name") == plugin]
