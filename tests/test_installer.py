"""The installer's pure parts: the index of installed packages and the request an operator sends."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from nats.aio.client import Client
from tuxpilot.agent import installed
from tuxpilot.agent.installer import Request
from tuxpilot.protocol.errors import BadRequest
from tuxpilot.protocol.manifest import Permission


def record(name: str, version: str) -> installed.Record:
    return installed.Record(name=name, version=version, sha256="ab" * 32, signed=True, publisher="0123456789abcdef",
                            source="file", installed_at="2026-01-01T00:00:00+00:00")


def test_the_index_round_trips_and_leaves_out_a_folder_deleted_by_hand(tmp_path: Path) -> None:
    assert installed.read(tmp_path) == {}
    records = {"hello": record("hello", "0.1.0"), "gone": record("gone", "1.0.0")}
    installed.write(tmp_path, records)
    assert installed.read(tmp_path) == records
    installed.version_dir(tmp_path, "hello", "0.1.0").mkdir(parents=True)
    assert installed.names(tmp_path) == ["hello"]  # gone's folder is not there: not run, no crash
    assert sorted(installed.folders(tmp_path)) == sorted(r.folder(tmp_path) for r in records.values())


def test_an_unreadable_index_reads_as_empty(tmp_path: Path) -> None:
    installed.root(tmp_path).mkdir(parents=True)
    (installed.root(tmp_path) / installed.INDEX_FILE).write_text("{not json")
    assert installed.read(tmp_path) == {} and installed.names(tmp_path) == []


def test_seal_leaves_the_code_read_only_to_others(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "code.py").write_text("")
    (folder / "run").write_text("#!/bin/sh\n")
    (folder / "run").chmod(0o777)
    (folder / "sub" / "code.py").chmod(0o666)
    installed.seal(folder)
    assert (folder / "sub" / "code.py").stat().st_mode & 0o777 == 0o644
    assert (folder / "run").stat().st_mode & 0o777 == 0o755
    assert (folder / "sub").stat().st_mode & 0o777 == 0o755


def test_a_request_is_a_package_or_a_name_and_grants_only_permissions() -> None:
    request = Request.parse(json.dumps({"package": base64.b64encode(b"tpkg").decode(),
                                        "grant": ["system_access"]}).encode(), 1024)
    assert request.package == b"tpkg" and request.grant == (Permission.system_access,)
    by_name = Request.parse(b'{"name": "hello", "version": "1.2.3"}', 1024)
    assert (by_name.name, by_name.version, by_name.package) == ("hello", "1.2.3", None)


@pytest.mark.parametrize("raw", [
    b"{nope", b"[]", b"{}", b'{"package": "***"}', b'{"name": "hello", "grant": ["root"]}',
    b'{"name": "../etc"}', b'{"name": "hello", "version": "1.0"}', b'{"name": "hello", "registry": "a b"}',
    b'{"name": 5}',
])
def test_a_bad_request_is_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        Request.parse(raw, 1024)


def test_a_request_over_the_limit_is_refused() -> None:
    with pytest.raises(BadRequest, match="registry"):
        Request.parse(b" " * 2000, 1024)


async def test_a_rolled_back_plugins_consumer_delivers_again_what_the_tried_version_acknowledged(nc: Client) -> None:
    """The consumer is kept across an update; when the update is rolled back, the old version gets again the
    events the tried one acknowledged meanwhile (its proposals are deduplicated by proposal id)."""
    from tuxpilot.bus.streams import (
        create_plugin_consumer,
        ensure_streams,
        plugin_consumer_floor,
        rewind_plugin_consumer,
    )
    from tuxpilot.protocol.manifest import Manifest
    from tuxpilot.protocol.names import Names, Subjects, plugin_consumer_name
    from tuxpilot.settings import StreamsConfig

    subjects, cfg = Subjects("tuxpilot", "h1"), StreamsConfig()
    js = nc.jetstream()
    await ensure_streams(js, subjects, cfg)
    manifest = Manifest.from_doc({"name": "hello", "version": "0.1.0", "description": "d", "author": "a",
                                  "license": "MIT", "category": "custom", "runtime": "python",
                                  "entry_point": "plugin.py", "api_version": "1", "subscribes": ["demo.ping"]})
    await create_plugin_consumer(js, manifest, subjects, cfg)
    stream, name = Names.of(subjects).events, plugin_consumer_name("hello", "h1")
    sub = await js.pull_subscribe_bind(durable=name, stream=stream)

    async def handle(n: int) -> list[int]:
        msgs = await sub.fetch(n, timeout=5)
        for msg in msgs:
            await msg.ack_sync()
        return [msg.metadata.sequence.stream for msg in msgs]

    for i in range(2):
        await js.publish(subjects.event("demo.ping"), json.dumps({"i": i}).encode())
    assert await handle(2) == [1, 2]  # the old version's work
    floor = await plugin_consumer_floor(js, manifest, subjects)
    assert floor == 2
    for i in range(3):
        await js.publish(subjects.event("demo.ping"), json.dumps({"i": i}).encode())
    assert await handle(3) == [3, 4, 5]  # the tried version's work, then it is rolled back
    assert await rewind_plugin_consumer(js, manifest, subjects, cfg, history=False, floor=floor)
    await sub.unsubscribe()
    again = await js.pull_subscribe_bind(durable=name, stream=stream)
    msgs = await again.fetch(3, timeout=5)
    assert [m.metadata.sequence.stream for m in msgs] == [3, 4, 5]
    # A consumer that did not get past the floor is left alone.
    for msg in msgs:
        await msg.ack_sync()
    assert not await rewind_plugin_consumer(js, manifest, subjects, cfg, history=False, floor=5)
