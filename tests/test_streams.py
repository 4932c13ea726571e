"""The streams' bounds against a real nats-server: one plugin's flood evicts only its own records."""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client
from tuxpilot.bus.streams import ensure_streams, stream_configs
from tuxpilot.protocol.names import Subjects
from tuxpilot.settings import StreamsConfig

SUBJECTS = Subjects("tuxpilot", "web-1")
KIB = 1024


async def flood_the_audit(nc: Client, cfg: StreamsConfig) -> int:
    """Another plugin's 100 records, then a flood of refused records of ~250 KiB each (the params copied
    in), 2.7 times the stream's size as in the attack that emptied a 1 GiB audit stream. Returns how
    many of the other plugin's records are left."""
    js = nc.jetstream()
    await ensure_streams(js, SUBJECTS, cfg)
    for i in range(100):
        record = {"status": "ok", "plugin": "sysmon", "action": "top_processes", "message": f"record {i}"}
        await js.publish(SUBJECTS.result("sysmon", "top_processes"), json.dumps(record).encode())
    big = json.dumps({"status": "refused", "plugin": "hog", "params": {"junk": "x" * (250 * KIB)}}).encode()
    for _ in range(7):
        acks = [await js.publish_async(SUBJECTS.result("hog", "cleanup"), big) for _ in range(100)]
        await asyncio.gather(*acks)
    info = await js.stream_info("tuxpilot_audit", subjects_filter="tuxpilot.result.>")
    return (info.state.subjects or {}).get(SUBJECTS.result("sysmon", "top_processes"), 0)


async def test_a_flood_of_large_records_evicts_only_the_flooders_own(nc: Client) -> None:
    # Scaled down 1 GiB -> 64 MiB so that the test fills it in seconds; per subject as many as fit.
    cfg = StreamsConfig(audit_max_bytes=64 * 1024 * KIB, audit_max_msgs_per_subject=200)
    left = await flood_the_audit(nc, cfg)
    info = await nc.jetstream().stream_info("tuxpilot_audit")
    print(f"other plugin's records left: {left}/100; audit holds {info.state.messages} records, "
          f"{info.state.bytes // (1024 * KIB)} MiB")
    assert left == 100


async def test_without_a_per_subject_limit_the_same_flood_wipes_the_others(nc: Client) -> None:
    # What the stream was: bytes and age only. The flood pushes everything else out.
    cfg = StreamsConfig(audit_max_bytes=64 * 1024 * KIB, audit_max_msgs_per_subject=2_000_000_000)
    left = await flood_the_audit(nc, cfg)
    print(f"without per-subject limits, other plugin's records left: {left}/100")
    assert left == 0


def test_every_stream_has_a_per_subject_limit_and_discards_the_oldest() -> None:
    for config in stream_configs(SUBJECTS, StreamsConfig()):
        assert config.max_msgs_per_subject and config.max_msgs_per_subject > 0, config.name
        assert config.max_bytes and config.max_age, config.name


async def test_a_bucket_is_read_without_a_consumer_deleted_keys_left_out(nc: Client) -> None:
    from tuxpilot.bus.streams import bucket_entries

    kv = await nc.jetstream().create_key_value(bucket="entries_test", history=1)
    for key in ("web-1.a", "web-1.b", "web-2.a"):
        await kv.put(key, key.encode())
    await kv.delete("web-1.b")
    assert await bucket_entries(nc.jetstream(), "entries_test") == {"web-1.a": b"web-1.a", "web-2.a": b"web-2.a"}
    assert await bucket_entries(nc.jetstream(), "entries_test", "web-1.*") == {"web-1.a": b"web-1.a"}
