"""The gate's memory in JetStream KV: which actions ran (effectively-once) and when (cooldowns).

The executions bucket holds each claim; the outcome is stored once, in the audit stream. (It was
written to the claim's key too: a second stored message per action that nothing read, ~15 % of the
server's CPU per event in `tuxpilot bench`.)

An action id is claimed with an atomic `create` before the action runs, so a redelivered proposal,
a restarted agent or two agents racing never execute the same action twice. An action whose
claim exists but whose outcome never arrived (the agent died mid-action) is not run again: for
remediation, at most once is the safe side. Cooldown times are written through to KV so they
survive a restart; each key expires with its cooldown (a per-message TTL), and a restarted gate
looks keys up one at a time as proposals need them, never by listing the bucket.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from typing import Any

import structlog
from nats.aio.client import Client
from nats.js.api import Header
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tuxpilot.bus.stored import Publisher
from tuxpilot.bus.streams import bounded_bucket
from tuxpilot.protocol.models import new_id
from tuxpilot.protocol.names import Names, Subjects, claim_key, cooldown_key
from tuxpilot.settings import StreamsConfig

log = structlog.get_logger("tuxpilot.ledger")

# A KV lookup or write the gate waits for; beyond it the gate goes on without (and says so).
KV_TIMEOUT_S = 2.0


# Claims this process made, remembered to tell "my create's ack was lost" from "someone else's".
_REMEMBERED_CLAIMS = 100_000
# The server's "wrong last sequence" refusals (JSStreamWrongLastSequenceErrF, …ConstantErr): the key exists.
_WRONG_LAST_SEQUENCE = (10071, 10164)


class Ledger:
    def __init__(self, nc: Client, subjects: Subjects, cfg: StreamsConfig, *, update: bool = True):
        self.update = update  # bring existing buckets to `cfg` (a fleet's host may not: its administrator does)
        self.instance = new_id()
        self._claimed: OrderedDict[str, None] = OrderedDict()
        self.nc = nc
        self.subjects = subjects
        self.cfg = cfg
        self.names = Names.of(subjects)
        self.executions: KeyValue | None = None
        self.cooldowns: KeyValue | None = None
        self.stored = Publisher(nc)

    async def start(self) -> None:
        await self.stored.start()
        js, cfg = self.nc.jetstream(), self.cfg
        self.executions = await bounded_bucket(
            js, self.names.executions, max_age=cfg.executions_ttl_s, max_bytes=cfg.executions_max_bytes,
            replicas=cfg.replicas, what="TuxPilot: action ids the gates claimed, and their outcome", update=self.update,
        )
        self.cooldowns = await bounded_bucket(
            js, self.names.cooldowns, max_age=cfg.cooldowns_max_age_s, max_bytes=cfg.cooldowns_max_bytes,
            replicas=cfg.replicas, what="TuxPilot: when each action last ran on each resource, per host",
            update=self.update,
        )

    async def claim(self, action_id: str) -> dict[str, Any] | None:
        """Claim `action_id`; None when the claim is new (or ours, its ack lost), else the earlier record."""
        assert self.executions is not None
        record = {"state": "started", "at": time.time(), "host": self.subjects.host, "instance": self.instance}
        try:
            await self._create(action_id, json.dumps(record).encode())
        except KeyWrongLastSequenceError:
            try:
                entry = await self.executions.get(claim_key(self.subjects.host, action_id))
                earlier: dict[str, Any] = json.loads(entry.value or b"{}")
            except Exception:
                return {"state": "unknown"}
            # Our own create reached the server but its ack did not reach us (a reconnect): still ours.
            if earlier.get("instance") != self.instance or action_id in self._claimed:
                return earlier
        self._claimed[action_id] = None
        if len(self._claimed) > _REMEMBERED_CLAIMS:
            self._claimed.popitem(last=False)
        return None

    async def stop(self) -> None:
        await self.stored.stop()

    async def _create(self, action_id: str, value: bytes) -> None:
        """KV create as one stored publish that expects no earlier value; when there is one, nats-py's
        `create` decides (it also recreates a key whose last value is a delete marker)."""
        assert self.executions is not None
        try:
            key = claim_key(self.subjects.host, action_id)
            await self.stored.publish(f"$KV.{self.names.executions}.{key}", value,
                                      headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except APIError as exc:
            if exc.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            await self.executions.create(key, value)  # KeyWrongLastSequenceError: claimed before

    async def cooldown_since(self, key: str) -> float | None:
        """When the action of cooldown `key` last ran on this host (wall clock), if its cooldown is still kept."""
        assert self.cooldowns is not None
        kv_key = cooldown_key(self.subjects.host, key)
        try:
            entry = await asyncio.wait_for(self.cooldowns.get(kv_key), KV_TIMEOUT_S)
        except KeyNotFoundError:  # never ran, or its TTL expired
            return None
        except Exception as exc:  # the server is slow or away: pace from memory only
            log.warning("ledger.cooldown_unreadable", key=key, error=f"{type(exc).__name__}: {exc}"[:200])
            return None
        try:
            doc = json.loads(entry.value or b"{}")
            return float(doc["at"]) if doc.get("key") == key else None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ledger.bad_cooldown", key=key, error=str(exc)[:200])
            return None

    async def save_cooldown(self, key: str, at: float, keep_s: float) -> None:
        """Write through; the key expires `keep_s` after `at` (whole seconds, at least one: the TTL's unit)."""
        subject = f"$KV.{self.names.cooldowns}.{cooldown_key(self.subjects.host, key)}"
        body = json.dumps({"key": key, "at": at}).encode()
        try:
            await self.nc.jetstream().publish(subject, body, msg_ttl=max(1, math.ceil(keep_s)), timeout=KV_TIMEOUT_S)
        except Exception as exc:  # memory still paces this process; only a restart would forget it
            log.warning("ledger.cooldown_unsaved", key=key, error=f"{type(exc).__name__}: {exc}"[:200])
