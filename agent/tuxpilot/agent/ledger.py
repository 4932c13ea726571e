"""The gate's memory in JetStream KV: which actions ran (effectively-once) and when (cooldowns).

An action id is claimed with an atomic `create` before the action runs, so a redelivered proposal,
a restarted agent or two agents racing never execute the same action twice. An action whose
claim exists but whose outcome never arrived (the agent died mid-action) is not run again: for
remediation, at most once is the safe side. Cooldown times are written through to KV so they
survive a restart.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

import structlog
from nats.aio.client import Client
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tuxpilot.bus.streams import bucket
from tuxpilot.protocol.models import Result, new_id
from tuxpilot.protocol.names import Names, Subjects
from tuxpilot.settings import StreamsConfig

log = structlog.get_logger("tuxpilot.ledger")


def _kv_key(text: str) -> str:
    # KV keys allow only [-/_=.a-zA-Z0-9]; resources ("/var/lib", container names) need not.
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# Claims this process made, remembered to tell "my create's ack was lost" from "someone else's".
_REMEMBERED_CLAIMS = 100_000


class Ledger:
    def __init__(self, nc: Client, subjects: Subjects, cfg: StreamsConfig):
        self.instance = new_id()
        self._claimed: OrderedDict[str, None] = OrderedDict()
        self.nc = nc
        self.subjects = subjects
        self.cfg = cfg
        self.names = Names.of(subjects)
        self.executions: KeyValue | None = None
        self.cooldowns: KeyValue | None = None

    async def start(self) -> None:
        js = self.nc.jetstream()
        ttl, replicas = self.cfg.executions_ttl_s, self.cfg.replicas
        self.executions = await bucket(js, self.names.executions, ttl=ttl, replicas=replicas)
        self.cooldowns = await bucket(js, self.names.cooldowns, replicas=self.cfg.replicas)

    async def claim(self, action_id: str) -> dict[str, Any] | None:
        """Claim `action_id`; None when the claim is new (or ours, its ack lost), else the earlier record."""
        assert self.executions is not None
        record = {"state": "started", "at": time.time(), "host": self.subjects.host, "instance": self.instance}
        try:
            await self.executions.create(action_id, json.dumps(record).encode())
        except KeyWrongLastSequenceError:
            try:
                entry = await self.executions.get(action_id)
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

    async def finish(self, action_id: str, result: Result) -> None:
        """Record the outcome; a plain publish to the KV subject, not waited for (the claim is what guards)."""
        record = {"state": "done", "at": time.time(), "status": result.status, "host": self.subjects.host}
        await self.nc.publish(f"$KV.{self.names.executions}.{action_id}", json.dumps(record).encode())

    async def load_cooldowns(self) -> dict[str, float]:
        """Every cooldown key's last run (wall-clock seconds)."""
        assert self.cooldowns is not None
        found: dict[str, float] = {}
        try:
            keys = await self.cooldowns.keys()
        except Exception:  # an empty bucket says "no keys found" by raising
            return found
        for key in keys:
            try:
                entry = await self.cooldowns.get(key)
                doc = json.loads(entry.value or b"{}")
                found[doc["key"]] = float(doc["at"])
            except Exception as exc:
                log.warning("ledger.bad_cooldown", key=key, error=str(exc))
        return found

    async def save_cooldown(self, key: str, at: float) -> None:
        assert self.cooldowns is not None
        await self.cooldowns.put(_kv_key(key), json.dumps({"key": key, "at": at}).encode())
