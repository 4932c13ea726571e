"""The gate's KV memory against a real nats-server: bounded buckets, cooldown keys that expire, per host."""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client
from nats.js.api import DiscardPolicy
from tuxpilot.agent.config import Config
from tuxpilot.agent.ledger import Ledger
from tuxpilot.bus.streams import bounded_bucket
from tuxpilot.protocol.names import Names, Subjects

from tests.conftest import until


async def test_buckets_are_bounded_and_drop_their_oldest_keys_when_full(nc: Client, config: Config) -> None:
    ledger = Ledger(nc, Subjects.of(config), config.streams)
    await ledger.start()
    js, names = nc.jetstream(), Names.of(Subjects.of(config))
    for bucket, age, size in (
        (names.executions, config.streams.executions_ttl_s, config.streams.executions_max_bytes),
        (names.cooldowns, config.streams.cooldowns_max_age_s, config.streams.cooldowns_max_bytes),
    ):
        cfg = (await js.stream_info(f"KV_{bucket}")).config
        assert (cfg.max_age, cfg.max_bytes, cfg.discard) == (age, size, DiscardPolicy.OLD)
        assert cfg.allow_msg_ttl and cfg.max_msgs_per_subject == 1

    # Full: the oldest keys go, new claims still succeed (discard new would refuse every claim).
    small = await bounded_bucket(js, "bounded_test", max_age=3600, max_bytes=1024 * 1024)
    for i in range(300):
        await small.put(f"k{i}", b"x" * 8192)
    info = await js.stream_info("KV_bounded_test")
    assert info.state.bytes <= 1024 * 1024
    assert (await small.get("k299")).value == b"x" * 8192


async def test_an_existing_unbounded_bucket_is_brought_to_the_bounds(nc: Client, config: Config) -> None:
    js, names = nc.jetstream(), Names.of(Subjects.of(config))
    await js.create_key_value(bucket=names.cooldowns, history=1)  # as an older version created it
    await Ledger(nc, Subjects.of(config), config.streams).start()
    cfg = (await js.stream_info(f"KV_{names.cooldowns}")).config
    assert cfg.max_bytes == config.streams.cooldowns_max_bytes and cfg.discard == DiscardPolicy.OLD


async def test_a_cooldown_key_expires_with_its_cooldown_and_belongs_to_its_host(nc: Client, config: Config) -> None:
    ledger = Ledger(nc, Subjects.of(config), config.streams)
    await ledger.start()
    other = Ledger(nc, Subjects(config.subject_prefix, "other-host"), config.streams)
    await other.start()
    at = time.time()
    await ledger.save_cooldown("demo.reboot:/var", at, 1.0)
    await ledger.save_cooldown("demo.reboot:/home", at, 600.0)
    assert await ledger.cooldown_since("demo.reboot:/var") == at
    assert await other.cooldown_since("demo.reboot:/var") is None  # another host's gate is not paced by ours

    expired = False

    async def check() -> None:
        nonlocal expired
        while not expired:
            expired = await ledger.cooldown_since("demo.reboot:/var") is None
            await asyncio.sleep(0.2)

    task = asyncio.create_task(check())
    await until(lambda: expired, 10, "the 1 s cooldown key to expire")
    task.cancel()
    assert await ledger.cooldown_since("demo.reboot:/home") == at
