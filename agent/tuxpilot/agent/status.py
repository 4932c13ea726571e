"""What an operator asks first: is the bus there, what is stored, which plugins run, who is behind."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from nats.aio.client import Client

from tuxpilot.bus.plugin_state import read_states
from tuxpilot.bus.registry import instances_of, live_instances, open_bucket
from tuxpilot.bus.streams import bucket_entries
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.names import Names, Subjects
from tuxpilot.protocol.registry import RegistryEntry

TOKEN = re.compile(r"[a-z0-9_-]{1,64}")  # a plugin name; anything else is not asked about


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
        await open_bucket(js, subjects)
        for key, value in (await bucket_entries(js, Names.of(subjects).plugins)).items():
            try:
                registered[key] = RegistryEntry.from_json(value).manifest.version
            except TuxPilotError:  # shown as registered, of no known version
                registered[key] = None
    except Exception:  # an empty bucket has no keys and says so by raising
        pass
    try:
        states = {key: st.to_doc() for key, st in (await read_states(js, subjects)).items()}
        states_error = None
    except (TimeoutError, TuxPilotError) as exc:
        states, states_error = {}, f"{type(exc).__name__}: {exc}"
    running, impostors = await instances(nc, {key.split(".", 1)[1] for key in [*registered, *states]}, states)
    return {
        "connected": nc.is_connected,
        "url": nc.connected_url.geturl() if nc.connected_url else None,
        "server": {"name": info.get("server_name"), "version": info.get("version"), "jetstream": info.get("jetstream")},
        "rtt_ms": round(rtt_ms, 3),
        "streams": streams,
        "consumers": consumers,
        "registered": registered,
        "plugin_states": states,
        **({"plugin_states_error": states_error} if states_error else {}),
        "running": running,
        "impostors": impostors,
    }


def _instance(ping: dict[str, Any], states: dict[str, Any]) -> dict[str, Any]:
    meta = ping.get("metadata") or {}
    state = states.get(f"{meta.get('host')}.{ping.get('name')}") or {}
    return {
        "plugin": ping.get("name"),
        "host": meta.get("host"),
        "id": ping.get("id"),
        "version": ping.get("version"),
        "user": meta.get("user"),
        "pid": meta.get("pid"),
        # The process this host's agent started, by the pid the agent recorded (not by what it says).
        "started_by_agent": state.get("pid") is not None and str(state.get("pid")) == str(meta.get("pid")),
    }


async def instances(
    nc: Client, plugins: set[str], states: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The running instances of `plugins`, and the impostors: answers to the bare `$SRV.PING` that claim
    a plugin's name but do not answer that plugin's own `$SRV.PING.<name>`, which only the plugin's NATS
    user may subscribe to. An instance is counted only for the name the server vouches for."""
    claimed = await live_instances(nc)
    names = sorted(n for n in plugins | {str(p.get("name")) for p in claimed} if TOKEN.fullmatch(n))
    vouched = [p for found in await asyncio.gather(*(instances_of(nc, n) for n in names)) for p in found]
    ids = {p.get("id") for p in vouched}
    running = [_instance(p, states) for p in vouched]
    impostors = [_instance(p, states) for p in claimed if p.get("id") not in ids]
    return running, impostors
