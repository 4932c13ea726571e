"""One fleet host's agent against another's shared state, for real: two enrolled hosts' gates on one
operator-mode nats-server, each with its own minted agent and plugin users; web-2's agent (the compromised
one) tries to take web-1's claim, cooldown, registry entry and heartbeat, and to purge, delete from or
reconfigure the shared streams. The server refuses each; web-1 goes on working."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from tuxpilot.agent.steps import action_id
from tuxpilot.bus.registry import open_bucket
from tuxpilot.bus.server import NatsServer
from tuxpilot.fleet import admin, hub, member, scopes
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import (
    Names,
    Subjects,
    claim_key,
    cooldown_key,
    fleet_bucket,
    registry_key,
)

from tests.conftest import until
from tests.test_fleet import connect_creds, fleet_dir, fleet_server, sys_nc  # noqa: F401 - fixtures
from tests.test_leases import Host, Tally, audit, publish, start_host, until_record

HOSTS = ("web-1", "web-2")
NAMES = Names.of(Subjects("tuxpilot", "web-1"))


@pytest.fixture
async def two_hosts(tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer,  # noqa: F811
                    sys_nc: Client) -> AsyncIterator[dict[str, Host]]:  # noqa: F811
    for host in HOSTS:
        fleet, _ = admin.enroll(fleet_dir, host, {"role": "web"})
    await admin.push(sys_nc, fleet)
    admin_nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    await hub.prepare(admin_nc, fleet)  # every shared stream and bucket, as `fleet enroll` makes them
    await admin_nc.close()
    hosts: dict[str, Host] = {}
    try:
        for host in HOSTS:
            hosts[host] = await start_host(tmp_path, fleet_dir, fleet_server, host, Tally())
        yield hosts
    finally:
        for h in hosts.values():
            for stop in (h.gate.stop, h.registry.stop, h.plugin.stop):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(stop(), 5)
            for nc in (h.agent, h.plugin_nc):
                if not nc.is_closed:
                    await nc.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_host_cannot_touch_another_hosts_shared_state(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, two_hosts: dict[str, Host]  # noqa: F811
) -> None:
    web1, web2 = two_hosts["web-1"], two_hosts["web-2"]
    admin_nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    ajs = admin_nc.jetstream()
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    # web-2's agent, as a compromised host would use it: its own minted credential.
    enrollment = member.load_enrollment(fleet_dir / "hosts" / "web-2.json")
    evil = await connect_creds(fleet_server, member.write_creds(tmp_path / "evil", enrollment, "agent"),
                               scopes.inbox_of("agent", Subjects("tuxpilot", "web-2")), error_cb=on_error)
    try:
        # Both hosts work: an event each, decided and executed.
        await publish(web1, "fix.burst", 1)
        await publish(web2, "fix.burst", 2)
        await until_record(admin_nc, "tuxpilot.result.*.fixer.restart", 2, 30)
        # web-1's state in the shared buckets: a cooldown, its registry entry, its heartbeat.
        await web1.gate.ledger.save_cooldown("fixer.restart:disk", 1.0, 600)
        beat, entry = b'{"host": "web-1"}', b'{"name": "fixer"}'
        await web1.agent.jetstream().publish(f"$KV.{NAMES.plugins}.{registry_key('web-1', 'fixer')}", entry)
        await web1.agent.jetstream().publish(f"$KV.{fleet_bucket(Subjects('tuxpilot', 'web-1'))}.web-1", beat)
        before = {s: (await ajs.stream_info(s)).state.messages for s in (NAMES.events, NAMES.proposals)}

        # The next event web-1 will handle, and the claim its gate will make for it.
        upcoming = Event.new("fix.burst", "web-1", value=3)
        claim = claim_key("web-1", action_id(upcoming.id, "fixer", "restart", {"seq": 3}))
        audit_config = (await ajs.stream_info(NAMES.audit)).config.as_dict()
        attacks = [
            (f"$KV.{NAMES.executions}.{claim}", b'{"state": "started", "host": "web-2"}'),  # take its claim
            (f"$KV.{NAMES.cooldowns}.{cooldown_key('web-1', 'fixer.restart:disk')}", b"{}"),  # reset its cooldown
            (f"$KV.{NAMES.plugins}.{registry_key('web-1', 'fixer')}", b"{}"),  # rewrite its registry entry
            ("$KV.tuxpilot_fleet.web-1", b'{"host": "web-1", "at": 0}'),  # forge its heartbeat
            (f"$JS.API.STREAM.PURGE.{NAMES.events}", b"{}"),  # drop every host's events
            (f"$JS.API.STREAM.MSG.DELETE.{NAMES.proposals}", b'{"seq": 1}'),  # drop a proposal
            # Keep one audit record per subject: every host's trail would lose its history.
            (f"$JS.API.STREAM.UPDATE.{NAMES.audit}", json.dumps({**audit_config, "max_msgs_per_subject": 1}).encode()),
            # A stream of its own on web-1's public endpoints: its acks would answer web-1's callers first.
            ("$JS.API.STREAM.CREATE.grab", json.dumps({"name": "grab", "subjects": ["tuxpilot.act.web-1.>"]}).encode()),
        ]
        for subject, body in attacks:
            await evil.publish(subject, body, reply=f"{scopes.inbox_of('agent', Subjects('tuxpilot', 'web-2'))}.x")
        await evil.flush()
        await until(lambda: sum("permissions violation" in str(e).lower() for e in errors) >= len(attacks), 5,
                    f"{len(attacks)} refusals")
        refused = " ".join(str(e) for e in errors).lower()  # nats.py lowercases the error text
        for subject, _ in attacks:
            assert subject.lower() in refused, subject
        # A rollup on its own key (which would purge every host's claims) is refused by the bucket itself.
        with pytest.raises(Exception, match=r"(?i)rollup"):
            await evil.jetstream(timeout=2).publish(f"$KV.{NAMES.executions}.web-2.x", b"{}",
                                                    headers={"Nats-Rollup": "all"})

        # Nothing of web-1's changed.
        for s, n in before.items():
            assert (await ajs.stream_info(s)).state.messages == n, s
        assert (await ajs.stream_info(NAMES.audit)).config.max_msgs_per_subject != 1
        assert "grab" not in [s.config.name for s in await ajs.streams_info()]
        kv = f"$KV.{NAMES.plugins}.{registry_key('web-1', 'fixer')}"
        assert (await ajs.get_last_msg(f"KV_{NAMES.plugins}", kv)).data == entry
        got = await ajs.get_last_msg("KV_tuxpilot_fleet", "$KV.tuxpilot_fleet.web-1")
        assert got.data == beat
        assert await web1.gate.ledger.cooldown_since("fixer.restart:disk") == 1.0
        # …and web-1 still works: the event whose claim web-2 tried to take is executed, once.
        await web1.agent.jetstream().publish(Subjects.of(web1.config).event("fix.burst"), upcoming.to_json(),
                                             headers={"Nats-Msg-Id": upcoming.id})
        await until_record(admin_nc, "tuxpilot.result.web-1.fixer.restart", 2, 30)
        records = await audit(admin_nc, "tuxpilot.result.web-1.fixer.restart")
        assert [r["status"] for r in records] == ["ok", "ok"], records
        # web-2 keeps its own: it writes its own keys in the same buckets.
        await evil.jetstream(timeout=2).publish(f"$KV.{NAMES.executions}.web-2.own", b"{}")
        await evil.jetstream(timeout=2).publish("$KV.tuxpilot_fleet.web-2", b"{}")
    finally:
        for nc in (evil, admin_nc):
            await nc.close()


async def test_the_hub_takes_rollups_off_a_bucket_a_host_made(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, sys_nc: Client  # noqa: F811
) -> None:
    """A host that came first made the registry bucket as nats.py makes one (rollups allowed): `fleet enroll`
    (hub.prepare) takes them off, and from then on a rollup on the host's own key purges nothing."""
    fleet, _ = admin.enroll(fleet_dir, "web-1", {"role": "web"})
    await admin.push(sys_nc, fleet)
    enrollment = member.load_enrollment(fleet_dir / "hosts" / "web-1.json")
    host = await connect_creds(fleet_server, member.write_creds(tmp_path / "web-1", enrollment, "agent"),
                               scopes.inbox_of("agent", Subjects("tuxpilot", "web-1")))
    admin_nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    try:
        kv = await open_bucket(host.jetstream(), Subjects("tuxpilot", "web-1"))
        await kv.put(registry_key("web-1", "fixer"), b"{}")
        stream = f"KV_{NAMES.plugins}"
        assert (await admin_nc.jetstream().stream_info(stream)).config.allow_rollup_hdrs
        await hub.prepare(admin_nc, admin.load(fleet_dir))
        assert not (await admin_nc.jetstream().stream_info(stream)).config.allow_rollup_hdrs
        with pytest.raises(Exception, match=r"(?i)rollup"):
            await host.jetstream(timeout=2).publish(f"$KV.{NAMES.plugins}.web-1.other", b"{}",
                                                    headers={"Nats-Rollup": "all"})
        assert (await admin_nc.jetstream().stream_info(stream)).state.messages == 1
    finally:
        for nc in (host, admin_nc):
            await nc.close()
