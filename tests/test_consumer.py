"""`Durable` against a real nats-server: a consumer someone re-pointed is restored, with what it skipped;
a new plugin's consumer starts at new events unless the host asks for history."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from tuxpilot.agent.config import Config
from tuxpilot.bus import connect as bus
from tuxpilot.bus.consumer import Durable, differences
from tuxpilot.bus.streams import create_plugin_consumer, ensure_streams
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Subjects

from tests.conftest import until
from tests.test_faults import counting_plugin


def test_differences_name_the_changed_fields_and_ignore_what_the_server_adds() -> None:
    want = ConsumerConfig(durable_name="d", filter_subjects=["a.b"], ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0,
                          max_deliver=5, metadata={"tuxpilot": "gate"})
    have = dataclasses.replace(want, metadata={"tuxpilot": "gate", "_nats.req.level": "1"}, filter_subjects=None,
                               filter_subject="a.b")
    assert differences(want, have) == []
    have = dataclasses.replace(have, filter_subject="nobody", max_deliver=1, ack_wait=3600.0)
    assert differences(want, have) == ["ack_wait", "max_deliver", "filter_subjects"]


async def test_a_re_pointed_consumer_is_restored_with_the_messages_it_skipped(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(name="S", subjects=["s.>"])
    seen: list[bytes] = []

    async def handler(msg: Msg) -> None:
        seen.append(msg.data)
        await msg.ack()

    durable = Durable(js, stream="S", name="d", filter_subjects=["s.a"], handler=handler)
    await durable.start()
    try:
        await js.publish("s.a", b"before")
        await until(lambda: seen == [b"before"], 10, "the first message")
        # Someone allowed to create consumers re-points ours ("create" on an existing durable updates it).
        info = await js.consumer_info("S", "d")
        await js.add_consumer("S", config=dataclasses.replace(info.config, filter_subjects=["s.nobody"]))
        for i in range(3):
            await js.publish("s.a", f"meanwhile-{i}".encode())
        await until(lambda: len(seen) == 4, 20, "the messages stored meanwhile, after the restore")
        assert sorted(seen[1:]) == [b"meanwhile-0", b"meanwhile-1", b"meanwhile-2"]
        assert durable.restored == 1
        assert (await js.consumer_info("S", "d")).config.filter_subjects == ["s.a"]
    finally:
        await durable.stop()


async def test_a_new_plugin_does_not_act_on_events_from_before_its_first_start(nc: Client, config: Config) -> None:
    subjects = Subjects.of(config)
    await ensure_streams(nc.jetstream(), subjects, config.streams)
    old = Event.new("counter.tick", "test-host", value=1)
    await bus.publish_event(nc, subjects, old)
    plugin, _ = counting_plugin()
    proposals: list[dict[str, Any]] = []

    async def on_proposal(msg: Msg) -> None:
        proposals.append(json.loads(msg.data))

    await nc.subscribe("tuxpilot.proposal.>", cb=on_proposal)
    await plugin.start(nc, config)
    try:
        new = Event.new("counter.tick", "test-host", value=2)
        await bus.publish_event(nc, subjects, new)
        await until(lambda: any(p["event_id"] == new.id for p in proposals), 15, "a proposal for the new event")
        await asyncio.sleep(0.5)
        assert not any(p["event_id"] == old.id for p in proposals), "acted on an event from before its start"
    finally:
        await plugin.stop()


async def test_with_history_a_new_plugin_acts_on_the_events_kept(nc: Client, config: Config) -> None:
    subjects = Subjects.of(config)
    await ensure_streams(nc.jetstream(), subjects, config.streams)
    old = Event.new("counter.tick", "test-host", value=1)
    await bus.publish_event(nc, subjects, old)
    plugin, _ = counting_plugin()
    # What the agent does for `[plugins.counter] history = true` before it starts the plugin.
    await create_plugin_consumer(nc.jetstream(), plugin.manifest, subjects, config.streams, history=True)
    proposals: list[dict[str, Any]] = []

    async def on_proposal(msg: Msg) -> None:
        proposals.append(json.loads(msg.data))

    await nc.subscribe("tuxpilot.proposal.>", cb=on_proposal)
    await plugin.start(nc, config)
    try:
        await until(lambda: any(p["event_id"] == old.id for p in proposals), 15, "a proposal for the kept event")
    finally:
        await plugin.stop()
