"""Fleet-wide calls on this host: the gate's fan-out subject `P.fleet.act.<plugin>.<action>`.

Every host's agent subscribes with no queue group, so one request reaches them all (a publish to a
wildcard subject would reach no one). A host outside the request's targets stays silent; a targeted
host hands the request to its gate exactly as a call on its own `P.act.<host>…` subject (same steps,
same audit record) and its reply names the host.
"""

from __future__ import annotations

import contextlib

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request

from tuxpilot.agent.gate import Gate
from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.names import HOST_HEADER, Subjects

log = structlog.get_logger("tuxpilot.fanout")


class HostRequest(Request):
    """A request whose every reply carries the answering host, so a gatherer can tell them apart."""

    def __init__(self, msg: Msg, host: str):
        super().__init__(msg)
        self.host = host

    async def respond(self, data: bytes = b"", headers: dict[str, str] | None = None) -> None:
        await super().respond(data, headers={**(headers or {}), HOST_HEADER: self.host})


class FanOut:
    def __init__(self, nc: Client, subjects: Subjects, labels: dict[str, str], gate: Gate):
        self.nc, self.subjects, self.labels, self.gate = nc, subjects, labels, gate
        self._sub: Subscription | None = None

    async def __aenter__(self) -> FanOut:
        self._sub = await self.nc.subscribe(self.subjects.fleet_act("*", "*"), cb=self._on_msg)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            targets = Targets.of_headers(msg.headers)
        except TuxPilotError as exc:
            log.info("fleet.call_ignored", subject=msg.subject, why=exc.message)
            return  # a malformed target matches no one: silence, as for any host not targeted
        if not targets.match(self.subjects.host, self.labels):
            return
        *_, plugin, action = msg.subject.split(".")
        log.info("fleet.call", plugin=plugin, action=action, hosts=list(targets.hosts), labels=targets.labels)
        await self.gate.serve_call(HostRequest(msg, self.subjects.host), plugin, action)
