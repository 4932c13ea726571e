"""Fleet concurrency limits (agent/leases.py) against a real nats-server in operator mode: several hosts'
gates, each with its own minted agent user and its own plugin user, hold a fleet limit under a burst of
events; a host that dies holding a lease blocks the others only until the lease's TTL; no host can
take, drop or purge another's lease."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from tuxpilot.agent.config import Config, load_config
from tuxpilot.agent.gate import Gate
from tuxpilot.agent.leases import _place, allowed, group_labels
from tuxpilot.agent.registry import Registry
from tuxpilot.bus.server import NatsServer
from tuxpilot.bus.streams import create_plugin_consumer, ensure_streams
from tuxpilot.fleet import admin, hub, member, scopes
from tuxpilot.protocol.manifest import FleetLimit, Manifest
from tuxpilot.protocol.models import Event, ProposedAction, Reason, Status
from tuxpilot.protocol.names import Subjects, lease_group, leases_bucket
from tuxpilot.sdk.plugin import Context, Plugin

from tests.conftest import until
from tests.test_fleet import connect_creds, fleet_dir, fleet_server, sys_nc  # noqa: F401 - fixtures

HOSTS = ("web-1", "web-2", "web-3", "web-4")


def test_group_and_bound() -> None:
    web = FleetLimit(max=2, labels={"role": "web"})
    assert group_labels(web, {"role": "web", "dc": "a"}) == {"role": "web"}
    assert group_labels(web, {"role": "db"}) is None  # not in the group: the limit does not apply
    by_dc = FleetLimit(percent=25, group_by=["dc"])
    assert group_labels(by_dc, {"dc": "a"}) == {"dc": "a"}
    assert allowed(by_dc, 10) == 2 and allowed(by_dc, 3) == 1  # at least one
    with pytest.raises(ValueError, match="exactly one"):
        FleetLimit(max=1, percent=10)
    assert lease_group("docker", "restart", {"role": "web"}) == lease_group("docker", "restart", {"role": "web"})
    # A renewed lease keeps the place of its first write; a value cannot claim a place after its own.
    assert _place(b'{"first": 3}', 10) == 3 and _place(b"{}", 10) == 10 and _place(b'{"first": 12}', 10) == 10
    assert _place(b"not json", 10) == 10
    assert lease_group("docker", "restart", {"role": "web"}) != lease_group("docker", "restart", {"role": "db"})


@dataclass
class Tally:
    """What ran where and on how many hosts at once, across every host (their plugins share this process)."""

    running: dict[str, int] = field(default_factory=dict)
    most: int = 0  # hosts running fixer.restart at the same time, at most
    ran: list[tuple[str, int]] = field(default_factory=list)
    hung: asyncio.Event = field(default_factory=asyncio.Event)


def slow_plugin(tally: Tally, host: str) -> Plugin:
    manifest = Manifest.from_doc({
        "name": "fixer", "version": "1.0.0", "description": "remediates slowly", "category": "custom",
        "runtime": "python", "entry_point": "plugin.py", "api_version": "1", "subscribes": ["fix.*"],
        "actions": {
            "restart": {"timeout_s": 30, "params": {"type": "object", "properties": {"seq": {"type": "integer"}}}},
            # The manifest carries this one's limit; a host policy the other's.
            "hang": {"timeout_s": 30, "params": {"type": "object"}, "fleet_limit": {"max": 1, "lease_s": 3}},
        },
    })
    plugin = Plugin(manifest)

    @plugin.on("fix.burst")
    def burst(event: Event, ctx: Context) -> list[ProposedAction]:
        return [ctx.propose("restart", {"seq": int(event.value or 0)}, resource=str(event.value))]

    @plugin.on("fix.hang")
    def hang_on(event: Event, ctx: Context) -> list[ProposedAction]:
        return [ctx.propose("hang", {}, resource=str(event.value))]

    @plugin.action("restart")
    async def restart(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
        tally.running[host] = tally.running.get(host, 0) + 1
        tally.most = max(tally.most, sum(1 for n in tally.running.values() if n))
        try:
            await asyncio.sleep(0.4)
        finally:
            tally.running[host] -= 1
        tally.ran.append((host, params["seq"]))
        return {"seq": params["seq"]}

    @plugin.action("hang")
    async def hang(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
        tally.hung.set()
        await asyncio.sleep(60)  # the host dies before this ends
        return {}

    return plugin


@dataclass
class Host:
    name: str
    config: Config
    agent: Client
    plugin_nc: Client
    gate: Gate
    registry: Registry
    plugin: Plugin


async def start_host(tmp_path: Path, fleet_dir: Path, server: NatsServer, host: str, tally: Tally) -> Host:  # noqa: F811
    config = load_config(environ={
        "TUXPILOT_NATS_URL": server.url, "TUXPILOT_HOST_ID": host, "TUXPILOT_STATE_DIR": str(tmp_path / host),
        "TUXPILOT_FLEET_ENROLLMENT": str(fleet_dir / "hosts" / f"{host}.json"),
        "TUXPILOT_FLEET_LABELS": json.dumps({"role": "web"}),
    })
    config.gate.cooldown_s = 0
    config.gate.fleet_limits = {"fixer.restart": FleetLimit(max=2, labels={"role": "web"}, lease_s=30)}
    enrollment = member.load_enrollment(fleet_dir / "hosts" / f"{host}.json")
    subjects = Subjects.of(config)
    state = tmp_path / host
    agent = await connect_creds(server, member.write_creds(state, enrollment, "agent"),
                                scopes.inbox_of("agent", subjects))
    plugin_nc = await connect_creds(server, member.write_creds(state, enrollment, "plugin", "fixer"),
                                    scopes.inbox_of("plugin", subjects, "fixer"))
    plugin = slow_plugin(tally, host)
    await ensure_streams(agent.jetstream(), subjects, config.streams, update=False)
    await create_plugin_consumer(agent.jetstream(), plugin.manifest, subjects, config.streams)
    await plugin.start(plugin_nc, config)
    registry = Registry(agent, subjects, {"fixer": plugin.manifest}, {})
    await registry.start()
    gate = Gate(agent, config, registry)
    await gate.start()
    return Host(host, config, agent, plugin_nc, gate, registry, plugin)


@pytest.fixture
async def web_hosts(tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer,  # noqa: F811
                    sys_nc: Client) -> AsyncIterator[tuple[dict[str, Host], Tally]]:  # noqa: F811
    for host in HOSTS:
        fleet, _ = admin.enroll(fleet_dir, host, {"role": "web"})
    await admin.push(sys_nc, fleet)
    admin_nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    await hub.prepare(admin_nc, fleet)  # the leases bucket: hosts may not create it
    await admin_nc.close()
    tally = Tally()
    hosts: dict[str, Host] = {}
    try:
        for host in HOSTS:
            hosts[host] = await start_host(tmp_path, fleet_dir, fleet_server, host, tally)
        yield hosts, tally
    finally:
        for h in hosts.values():
            for stop in (h.gate.stop, h.registry.stop, h.plugin.stop):
                with contextlib.suppress(Exception):  # a host the test killed: its connection is gone
                    await asyncio.wait_for(stop(), 5)
            for nc in (h.agent, h.plugin_nc):
                if not nc.is_closed:
                    await nc.close()


async def audit(nc: Client, subject: str) -> list[dict[str, Any]]:
    """Every audit record on `subject` (a wildcard), read by direct gets."""
    js, records, seq = nc.jetstream(), [], 1
    while True:
        try:
            msg = await js.get_msg("tuxpilot_audit", seq=seq, subject=subject, next=True)
        except NotFoundError:
            return records
        records.append(json.loads(msg.data))
        seq = (msg.seq or seq) + 1


async def publish(h: Host, event_type: str, value: int) -> None:
    event = Event.new(event_type, h.name, value=value)
    await h.agent.jetstream().publish(Subjects.of(h.config).event(event_type), event.to_json(),
                                      headers={"Nats-Msg-Id": event.id})


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_fleet_limit_holds_under_a_burst_and_a_dead_holder_blocks_only_its_lease(
    fleet_dir: Path, fleet_server: NatsServer, web_hosts: tuple[dict[str, Host], Tally]  # noqa: F811
) -> None:
    hosts, tally = web_hosts
    per_host = 4
    # A burst: every host gets its events at once; each wants to run fixer.restart (limit: 2 web hosts).
    await asyncio.gather(*(publish(h, "fix.burst", i) for h in hosts.values() for i in range(per_host)))
    watcher = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    try:
        total = per_host * len(hosts)

        await until_record(watcher, "tuxpilot.result.*.fixer.restart", total, 60)
        got = await audit(watcher, "tuxpilot.result.*.fixer.restart")
        assert len(got) == total, f"{len(got)} of {total} decided"
        ok = [r for r in got if r["status"] == "ok"]
        limited = [r for r in got if r.get("reason") == Reason.fleet_limit]
        assert tally.most <= 2, f"{tally.most} hosts ran fixer.restart at once, the limit is 2"
        assert len(ok) == len(tally.ran) and ok and limited, (len(ok), len(limited))
        assert len(ok) + len(limited) == total, [r for r in got if r not in ok and r not in limited]
        refused = limited[0]
        assert refused["status"] == Status.refused and refused["error"]["details"]["limit"] == 2
        print(f"burst of {total}: ran {len(ok)} on {sorted({h for h, _ in tally.ran})}, refused fleet_limit "
              f"{len(limited)}, at most {tally.most} hosts at once")

        # web-1 takes the only lease of fixer.hang (manifest: max 1, lease 3 s) and dies mid-action.
        victim = hosts["web-1"]
        await publish(victim, "fix.hang", 1)
        await asyncio.wait_for(tally.hung.wait(), 20)
        died = time.monotonic()
        await victim.plugin_nc.close()
        await victim.agent.close()  # gone without giving its lease back
        # Meanwhile the others are refused, naming the dead holder...
        await publish(hosts["web-2"], "fix.hang", 2)
        await until_record(watcher, "tuxpilot.result.web-2.fixer.hang", 1, 20)
        first = (await audit(watcher, "tuxpilot.result.web-2.fixer.hang"))[0]
        if time.monotonic() - died < 3:
            assert first.get("reason") == Reason.fleet_limit and "web-1" in first["message"], first
        # ... and once the lease's TTL is over, the next one runs.
        await asyncio.sleep(max(0.0, died + 3.5 - time.monotonic()))
        tally.hung.clear()
        await publish(hosts["web-3"], "fix.hang", 3)
        await asyncio.wait_for(tally.hung.wait(), 20)
        print(f"the dead holder's lease blocked the others for {time.monotonic() - died:.1f} s (lease_s 3)")
    finally:
        await watcher.close()


async def until_record(nc: Client, subject: str, count: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while len(await audit(nc, subject)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {count} record(s) on {subject}")
        await asyncio.sleep(0.1)


async def test_a_host_cannot_touch_another_hosts_lease(
    tmp_path: Path, fleet_dir: Path, fleet_server: NatsServer, sys_nc: Client  # noqa: F811
) -> None:
    for host in ("web-1", "web-2"):
        fleet, _ = admin.enroll(fleet_dir, host, {"role": "web"})
    await admin.push(sys_nc, fleet)
    admin_nc = await connect_creds(fleet_server, fleet_dir / "admin.creds")
    await hub.prepare(admin_nc, fleet)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    subjects = Subjects("tuxpilot", "web-1")
    creds = {h: member.write_creds(tmp_path / h, member.load_enrollment(fleet_dir / "hosts" / f"{h}.json"), "agent")
             for h in ("web-1", "web-2")}
    web1 = await connect_creds(fleet_server, creds["web-1"], "_INBOX_tuxpilot-web-1-agent")
    evil = await connect_creds(fleet_server, creds["web-2"], "_INBOX_tuxpilot-web-2-agent", error_cb=on_error)
    bucket, group = leases_bucket(subjects), lease_group("docker", "restart_container", {"role": "web"})
    stream = f"KV_{bucket}"
    try:
        await web1.jetstream().publish(f"$KV.{bucket}.{group}.web-1", b'{"host": "web-1"}', msg_ttl=60)
        ejs = evil.jetstream(timeout=1)
        # Overwrite or delete web-1's lease, or write one in its name: refused by the server.
        await evil.publish(f"$KV.{bucket}.{group}.web-1", b"", headers={"KV-Operation": "DEL"})
        # Purge, delete messages of, reconfigure or remove the bucket, or empty the audit trail: refused too.
        for api in (f"STREAM.PURGE.{stream}", f"STREAM.MSG.DELETE.{stream}", f"STREAM.DELETE.{stream}",
                    f"STREAM.UPDATE.{stream}", "STREAM.PURGE.tuxpilot_audit", "STREAM.DELETE.tuxpilot_audit"):
            await evil.publish(f"$JS.API.{api}", b"{}", reply="_INBOX_tuxpilot-web-2-agent.x")
        await evil.flush()
        await until(lambda: sum("permissions violation" in str(e).lower() for e in errors) >= 7, 5, "7 refusals")
        # A rollup on its own key (which would purge the whole bucket) is refused by the bucket itself.
        with pytest.raises(Exception, match=r"(?i)rollup"):
            await ejs.publish(f"$KV.{bucket}.{group}.web-2", b"{}", headers={"Nats-Rollup": "all"})
        # Its own key it may write.
        await ejs.publish(f"$KV.{bucket}.{group}.web-2", b'{"host": "web-2"}', msg_ttl=60)
        held = await admin_nc.jetstream().get_last_msg(stream, f"$KV.{bucket}.{group}.web-1")
        assert held.data == b'{"host": "web-1"}'
        info = await admin_nc.jetstream().stream_info(stream)
        assert info.state.messages == 2 and not info.config.allow_rollup_hdrs
    finally:
        for nc in (web1, evil, admin_nc):
            await nc.close()


async def test_no_bucket_refuses_rather_than_runs(tmp_path: Path, nats_server: NatsServer) -> None:
    """Without its bucket (a fleet's hosts may not create it) a limited action is refused, not run."""
    from tuxpilot.agent.leases import LeaseRefused, Leases

    nc = await nats.connect(nats_server.url)
    try:
        leases = Leases(nc, Subjects("tuxpilot", "web-1"), {"role": "web"}, create=False)
        with pytest.raises(LeaseRefused, match="could not be taken"):
            await leases.acquire("fixer", "restart", FleetLimit(max=1), 5, "a1")
        single = Leases(nc, Subjects("tuxpilot", "web-1"), {}, create=True)  # a single host makes its own
        lease = await single.acquire("fixer", "restart", FleetLimit(max=1), 5, "a1")
        assert lease is not None
        with pytest.raises(LeaseRefused, match="fleet limit is 1: web-1"):
            await Leases(nc, Subjects("tuxpilot", "web-2"), {}, create=True).acquire(
                "fixer", "restart", FleetLimit(max=1), 5, "a2")
        await single.release(lease)
        assert await Leases(nc, Subjects("tuxpilot", "web-2"), {}, create=True).acquire(
            "fixer", "restart", FleetLimit(max=1), 5, "a3") is not None
    finally:
        await nc.close()





async def test_percent_counts_the_groups_alive_hosts(nats_server: NatsServer) -> None:
    """percent = 50 of role=web: 4 web hosts beat (a fifth is lost, a db host is not in the group): K = 2."""
    from tuxpilot.agent.leases import LeaseRefused, Leases
    from tuxpilot.fleet.heartbeat import Beat, open_heartbeats

    nc = await nats.connect(nats_server.url)
    try:
        beats = await open_heartbeats(nc.jetstream(), Subjects("tuxpilot", "admin"))
        now = time.time()
        for host, role, age in (("web-1", "web", 0), ("web-2", "web", 1), ("web-3", "web", 2), ("web-4", "web", 0),
                                ("web-5", "web", 100), ("db-1", "db", 0)):
            beat = Beat(host=host, version="1", labels={"role": role}, started=now - 200, at=now - age, ttl_s=15)
            await beats.put(host, beat.model_dump_json().encode())
        limit = FleetLimit(percent=50, labels={"role": "web"})

        def leases(host: str) -> Leases:
            return Leases(nc, Subjects("tuxpilot", host), {"role": "web"}, create=True)

        assert await leases("web-1").members(nc.jetstream(), {"role": "web"}) == 4
        assert await leases("web-1").acquire("fixer", "restart", limit, 5, "a1") is not None
        assert await leases("web-2").acquire("fixer", "restart", limit, 5, "a2") is not None
        with pytest.raises(LeaseRefused, match="fleet limit is 2: web-1, web-2") as refused:
            await leases("web-3").acquire("fixer", "restart", limit, 5, "a3")
        assert refused.value.details["holders"] == ["web-1", "web-2"]
        db = Leases(nc, Subjects("tuxpilot", "db-1"), {"role": "db"}, create=True)
        assert await db.acquire("fixer", "restart", limit, 5, "a4") is None  # not in the group: not limited
    finally:
        await nc.close()


async def test_a_host_runs_its_cases_under_one_lease(nats_server: NatsServer) -> None:
    """max = 1: web-1's second case runs under its lease (renewed, as less than lease_s was left); web-2
    is refused until web-1's last case gives the lease back."""
    from tuxpilot.agent.leases import LeaseRefused, Leases

    nc = await nats.connect(nats_server.url)
    try:
        limit = FleetLimit(max=1, lease_s=2)
        web1 = Leases(nc, Subjects("tuxpilot", "web-1"), {}, create=True)
        web2 = Leases(nc, Subjects("tuxpilot", "web-2"), {}, create=True)
        first = await web1.acquire("fixer", "restart", limit, 5, "a1")
        await asyncio.sleep(1.2)  # less than lease_s left: the next case renews it
        second = await web1.acquire("fixer", "restart", limit, 5, "a2")
        assert first is not None and second is not None
        with pytest.raises(LeaseRefused, match="web-1"):
            await web2.acquire("fixer", "restart", limit, 5, "b1")
        await web1.release(first)
        with pytest.raises(LeaseRefused, match="web-1"):  # its second case still runs
            await web2.acquire("fixer", "restart", limit, 5, "b2")
        await web1.release(second)
        assert await web2.acquire("fixer", "restart", limit, 5, "b3") is not None
    finally:
        await nc.close()
