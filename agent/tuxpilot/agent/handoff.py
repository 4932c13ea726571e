"""Proposals handed to the gate by request (protocol: "Handing a proposal over").

A plugin may hand its proposal to its host's gate on `P.propose.H.<plugin>` instead of storing it in the
proposals stream first: the gate decides it as it would a stored one and answers once the decision is
recorded, and only then does the plugin ack its event. That is one stored hop less per event (the
proposal's store, pull and ack) with the same guarantee: until the gate has answered, the event is not
acked, and a plugin that gets no answer in time stores the proposal as before.

What the gate remembers here makes the two paths meet without a second record: a stored copy of a
proposal the gate is deciding (or has decided) by request waits for that decision and is acked, and a
handover of one already decided is answered at once. Both are known by proposer and proposal id: the
proposer is the subject's (nats-server's word), so a plugin that reuses another's proposal ids settles
only its own.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Final

from nats.aio.msg import Msg

# Decided proposal ids kept (a proposal's copies arrive within seconds of each other; a later one still
# meets the action-id claim).
REMEMBERED: Final = 10_000
# The gate's answers: `{"decided": n}` (n records stored; the plugin acks its event), or `{"retry": why}`
# (nothing decided: the plugin stores the proposal, where the gate takes it when it can).
DECIDED, RETRY = "decided", "retry"
BUSY, BUS_UNAVAILABLE = "busy", "bus_unavailable"


class Settled:
    """The proposals the gate is deciding by request, and those it decided lately, by (proposer, id)."""

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._deciding: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._decided: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remembered = remembered

    def begin(self, proposer: str, proposal_id: str) -> None:
        self._deciding[proposer, proposal_id] = asyncio.get_running_loop().create_future()

    def end(self, proposer: str, proposal_id: str, decided: bool) -> None:
        """The decision is recorded (`decided`), or was not made (the bus could not store it for now)."""
        key = (proposer, proposal_id)
        waiting = self._deciding.pop(key, None)
        if decided:
            self._decided[key] = None
            self._decided.move_to_end(key)
            if len(self._decided) > self._remembered:
                self._decided.popitem(last=False)
        if waiting is not None and not waiting.done():
            waiting.set_result(decided)

    async def settled(self, proposer: str, proposal_id: str) -> bool:
        """Whether a copy of this proposal needs no decision of its own: decided by request already, or
        being decided and then decided (waited for)."""
        key = (proposer, proposal_id)
        if key in self._decided:
            return True
        waiting = self._deciding.get(key)
        return bool(await asyncio.shield(waiting)) if waiting is not None else False


async def answer(msg: Msg, decided: int | None = None, retry: str | None = None) -> None:
    """The gate's answer to a handed-over proposal (nothing to answer when the plugin did not wait)."""
    if not msg.reply:
        return
    body = {DECIDED: decided} if retry is None else {RETRY: retry}
    await msg.respond(json.dumps(body).encode())
