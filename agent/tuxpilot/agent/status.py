"""What an operator asks first: is the bus there, what is stored, which plugins run, who is behind."""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client

from tuxpilot.bus.registry import live_instances, open_bucket
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.names import Names, Subjects
from tuxpilot.protocol.registry import RegistryEntry


async def snapshot(nc: Client, subjects: Subjects) -> dict[str, Any]:
    """The connection, the streams, the registered and running plugins, and each consumer's backlog."""
    started = time.perf_counter()
    await nc.flush(timeout=5)
    rtt_ms = (time.perf_counter() - started) * 1000
    info = nc._server_info
    js = nc.jetstream()
    names = Names.of(subjects)
    streams: dict[str, Any] = {}
    consumers: list[dict[str, Any]] = []
    for name in (names.events, names.proposals, names.audit):
        try:
            si = await js.stream_info(name)
        except Exception as exc:
            streams[name] = {"error": str(exc)}
            continue
        streams[name] = {"messages": si.state.messages, "bytes": si.state.bytes}
        for ci in await js.consumers_info(name):
            consumers.append(
                {
                    "stream": name,
                    "name": ci.name,
                    "pending": ci.num_pending,
                    "ack_pending": ci.num_ack_pending,
                    "redelivered": ci.num_redelivered,
                }
            )
    registered: dict[str, Any] = {}
    try:
        kv = await open_bucket(js, subjects)
        for key in await kv.keys():
            entry = await kv.get(key)
            try:
                registered[key] = RegistryEntry.from_json(entry.value or b"").manifest.version
            except TuxPilotError:  # shown as registered, of no known version
                registered[key] = None
    except Exception:  # an empty bucket has no keys and says so by raising
        pass
    running = [
        {
            "plugin": p["name"],
            "host": (p.get("metadata") or {}).get("host"),
            "id": p["id"],
            "version": p["version"],
            "user": (p.get("metadata") or {}).get("user"),
            "pid": (p.get("metadata") or {}).get("pid"),
        }
        for p in await live_instances(nc)
    ]
    return {
        "connected": nc.is_connected,
        "url": nc.connected_url.geturl() if nc.connected_url else None,
        "server": {"name": info.get("server_name"), "version": info.get("version"), "jetstream": info.get("jetstream")},
        "rtt_ms": round(rtt_ms, 3),
        "streams": streams,
        "consumers": consumers,
        "registered": registered,
        "running": running,
    }
