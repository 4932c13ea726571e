"""A leaf host (fleet/leaf.py) against real nats-servers: the hub in operator mode with its JetStream domain,
and the host's own leaf server with its domain, connected as the host's leaf user. Its agent keeps deciding
and executing its own events while the hub is down; once the hub is back, the hub's audit stream holds
every one of the host's records exactly once (sourced across domains, never published twice)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import load_config
from tuxpilot.bus.server import NatsServer
from tuxpilot.fleet import admin, hub, leaf, member
from tuxpilot.fleet.gather import gather
from tuxpilot.fleet.heartbeat import open_heartbeats, read_beat
from tuxpilot.fleet.targets import Targets
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import HUB_DOMAIN, Subjects, leaf_domain

from tests.conftest import until
from tests.test_cluster import free_ports

pytestmark = pytest.mark.slow

HOST = "edge-1"


@pytest.fixture
def hub_fleet(tmp_path: Path) -> Iterator[tuple[Path, NatsServer]]:
    """A fleet whose hub accepts leaf nodes, `edge-1` enrolled as a leaf host and `edge-2` as another."""
    port, leaf_port = free_ports(2)
    folder = tmp_path / "fleet"
    admin.init(folder, urls=[f"nats://127.0.0.1:{port}"], ports=[port], leaf_port=leaf_port,
               leaf_urls=[f"nats-leaf://127.0.0.1:{leaf_port}"])
    for host in (HOST, "edge-2"):
        fleet, _ = admin.enroll(folder, host, {"role": "edge"}, leaf=True)
    extra = admin.operator_block(fleet, tmp_path / "hub" / "jwt") + f'leafnodes {{ listen: "127.0.0.1:{leaf_port}" }}\n'
    server = NatsServer(tmp_path / "hub", port=port, domain=HUB_DOMAIN, extra_config=extra).start()
    yield folder, server
    server.stop()


async def connect(url: str, creds: Path, inbox: str = "_INBOX", **kw: Any) -> Client:
    return await nats.connect(url, user_credentials=str(creds), inbox_prefix=inbox, allow_reconnect=False, **kw)


async def records(nc: Client, host: str) -> list[dict[str, Any]]:
    js, found, seq = nc.jetstream(), [], 1
    while True:
        try:
            msg = await js.get_msg("tuxpilot_audit", seq=seq, subject=f"tuxpilot.result.{host}.>", next=True)
        except NotFoundError:
            return found
        found.append(json.loads(msg.data))
        seq = (msg.seq or seq) + 1


async def wait_records(nc: Client, host: str, count: int, limit: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit
    while True:
        try:
            got = await records(nc, host)
        except Exception:  # the server is still starting
            got = []
        if len(got) >= count:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(got)} of {count} records of {host}")
        await asyncio.sleep(0.2)


async def until_async(check: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def tick(operator: Client, n: int) -> None:
    event = Event.new("test.tick", HOST, value=n)
    await operator.jetstream().publish(f"tuxpilot.evt.{HOST}.test.tick", event.to_json(),
                                       headers={"Nats-Msg-Id": event.id})


@pytest.mark.timeout(300)
async def test_leaf_host_works_cut_off_and_its_audit_reaches_the_hub_once(
    tmp_path: Path, hub_fleet: tuple[Path, NatsServer]
) -> None:
    folder, hub_server = hub_fleet
    fleet = admin.load(folder)
    enrollment = member.load_enrollment(folder / "hosts" / f"{HOST}.json")
    state = tmp_path / f"state-{HOST}"
    leaf_server = NatsServer(tmp_path / "leaf", domain=leaf_domain(HOST),
                             extra_config=leaf.leaf_block(enrollment, member.write_creds(state, enrollment, "leaf")))
    leaf_server.start()
    host_cfg = tmp_path / f"{HOST}.toml"
    host_cfg.write_text(
        '[gate]\ncooldown_s = 0\n\n'
        '[[rules]]\nname = "tick"\nevents = ["test.tick"]\n'
        '[[rules.actions]]\nplugin = "sysmon"\naction = "top_processes"\n'
    )
    config = load_config(host_cfg, environ={
        "TUXPILOT_NATS_URL": leaf_server.url, "TUXPILOT_HOST_ID": HOST, "TUXPILOT_STATE_DIR": str(state),
        "TUXPILOT_MONITOR_ENABLED": "false", "TUXPILOT_FLEET_ENROLLMENT": str(folder / "hosts" / f"{HOST}.json"),
        "TUXPILOT_FLEET_LABELS": json.dumps({"role": "edge"}), "TUXPILOT_FLEET_HEARTBEAT_S": "0.5",
    })
    config.nats.reconnect_wait_s = 0.2
    operator_creds = member.write_creds(state, enrollment, "operator")
    try:
        async with Agent(config, embedded=False) as agent:
            assert agent.nc is not None
            local = await connect(leaf_server.url, operator_creds, f"_INBOX_tuxpilot-{HOST}-operator")
            # The hub's audit sources the leaf hosts' (done here, with the leaf up: a source that fails
            # retries after 10 s, 20 s, … up to 2 min, which this test need not wait for).
            admin_nc = await connect(hub_server.url, folder / "admin.creds")
            assert await hub.prepare(admin_nc, fleet) == [leaf_domain(HOST), leaf_domain("edge-2")]
            await admin_nc.close()
            try:
                # Linked: five events, five actions, on the leaf and (sourced) on the hub.
                for n in range(5):
                    await tick(local, n)
                linked = await wait_records(local, HOST, 5, 60)
                watcher = await connect(hub_server.url, folder / "admin.creds")
                await wait_records(watcher, HOST, 5, 30)
                # Its heartbeats are sourced too: the hub's fleet status sees it.
                beats = await open_heartbeats(watcher.jetstream(), Subjects("tuxpilot", "admin"))
                await until_async(lambda: read_beat(beats, HOST), 30, "edge-1's beat on the hub")
                await watcher.close()

                # Cut: the hub goes away; the host goes on deciding and executing its own events.
                hub_server.stop()
                for n in range(5, 12):
                    await tick(local, n)
                cut_off = await wait_records(local, HOST, 12, 60)
                assert {r["status"] for r in cut_off} == {"ok"}, [r for r in cut_off if r["status"] != "ok"]
                assert len({r["event_id"] for r in cut_off}) == 12
                assert len(cut_off) >= len(linked) + 7

                # Back: the hub's audit stream catches up from where its source stopped.
                hub_server.start()
                back = time.monotonic()
                watcher = await connect(hub_server.url, folder / "admin.creds")
                try:
                    on_hub = await wait_records(watcher, HOST, len(cut_off), 150)
                    caught_up = time.monotonic() - back
                    await asyncio.sleep(2.0)  # let a duplicate show itself
                    on_hub = await records(watcher, HOST)
                    leaf_ids = sorted(r["id"] for r in await records(local, HOST))
                    hub_ids = sorted(r["id"] for r in on_hub)
                    assert hub_ids == leaf_ids, (len(hub_ids), len(leaf_ids))
                    assert len(set(hub_ids)) == len(hub_ids), "a record reached the hub twice"
                    # A fleet-wide call from the hub reaches its gate, and its answer comes back.
                    replies = await gather(watcher, Subjects("tuxpilot", "admin"), "sysmon", "top_processes", b"{}",
                                           Targets(hosts=(HOST,)), deadline_s=15, expected={HOST})
                    assert [(r.host, r.status) for r in replies] == [(HOST, "ok")], replies
                    # Revoked, its leaf connection is refused by the hub.
                    sys_nc = await connect(hub_server.url, folder / "sys.creds")
                    await admin.push(sys_nc, admin.revoke(folder, HOST))
                    await sys_nc.close()
                    await until(lambda: any("authorization" in line.lower() for line in leaf_server.output), 15,
                                "the hub refusing the revoked host's leaf connection")
                    print(f"leaf records: {len(leaf_ids)} (7 while cut off), on the hub: {len(hub_ids)}, distinct; "
                          f"on the hub {caught_up:.1f} s after it came back")
                finally:
                    await watcher.close()
            finally:
                await local.close()
    finally:
        leaf_server.stop()


async def test_a_leaf_connection_cannot_forge_another_hosts_audit(
    tmp_path: Path, hub_fleet: tuple[Path, NatsServer]
) -> None:
    """edge-2's leaf user, used as a client of the hub: it may not publish on edge-1's source delivery
    subject (which would put records in edge-1's name into the hub's audit) nor on any audit subject."""
    folder, hub_server = hub_fleet
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    enrollment = member.load_enrollment(folder / "hosts" / "edge-2.json")
    creds = member.write_creds(tmp_path / "state-edge-2", enrollment, "leaf")
    evil = await connect(hub_server.url, creds, "_INBOX_tuxpilot-edge-2-leaf", error_cb=on_error)
    try:
        for subject in (f"tuxpilot.leafsrc.{HOST}.x", f"tuxpilot.result.{HOST}.sysmon.x",
                        "tuxpilot.result.edge-2.sysmon.x", f"$KV.tuxpilot_fleet.{HOST}"):  # its own beat: sourced
            await evil.publish(subject, b"{}")
        await evil.publish("tuxpilot.leafsrc.edge-2.x", b"{}")  # its own: allowed
        await evil.flush()
        await until(lambda: sum("permissions violation" in str(e).lower() for e in errors) >= 4, 5, "4 refusals")
        assert not any("leafsrc.edge-2" in str(e) for e in errors)
    finally:
        await evil.close()
