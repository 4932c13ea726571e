"""Stored publishes on a real server: what `js.publish` answers, through one inbox subscription."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.js.api import Header, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError
from tuxpilot.bus.stored import Publisher


async def test_stored_publish_answers_as_jetstream_does(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="stored", subjects=["stored.>"]))
    kv = await js.create_key_value(bucket="stored_kv")
    publisher = Publisher(nc)
    await publisher.start()
    try:
        first = await publisher.publish("stored.a", b"1", {"Nats-Msg-Id": "one"})
        # Many at once: each ack reaches its own publish.
        seqs = await asyncio.gather(*(publisher.publish("stored.b", str(i).encode()) for i in range(50)))
        assert sorted(seqs) == list(range(first + 1, first + 51))
        assert await publisher.publish("stored.a", b"1", {"Nats-Msg-Id": "one"}) == first  # deduplicated
        assert (await js.stream_info("stored")).state.messages == 51
        with pytest.raises(NoStreamResponseError):
            await publisher.publish("nowhere.a", b"1")
        # A KV create's "expected no earlier value": refused once the key exists, as nats-py's create is.
        create = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}
        await publisher.publish("$KV.stored_kv.k", b"v", create)
        with pytest.raises(APIError) as refused:
            await publisher.publish("$KV.stored_kv.k", b"w", create)
        assert refused.value.err_code in (10071, 10164)
        assert (await kv.get("k")).value == b"v"
    finally:
        await publisher.stop()
    with pytest.raises(RuntimeError):
        await publisher.publish("stored.a", b"1")
