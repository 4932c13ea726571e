"""A leaf host on a network of its own: the test makes a network namespace and a veth pair (its only
addresses), runs the host's leaf server, its agent and its plugin inside it, the hub outside, and cuts
the link for real (`ip link set … down`). Meanwhile events generated inside the namespace are decided and
executed there; once the link is back, the hub's audit holds every record of the host exactly once."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from tuxpilot.bus.server import NatsServer
from tuxpilot.fleet import admin, hub, leaf, member
from tuxpilot.protocol.names import HUB_DOMAIN, leaf_domain

from tests.conftest import need, tuxpilot_exe
from tests.test_cluster import free_ports
from tests.test_leaf import HOST, connect, records, tick, wait_records

pytestmark = pytest.mark.slow


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def can_make_namespaces() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"tp-probe-{secrets.token_hex(3)}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError):
        return False
    ip("netns", "del", probe)
    return True


@dataclass(frozen=True)
class Link:
    netns: str
    outside: str  # the veth end left outside, where the hub listens
    hub_ip: str
    edge_ip: str


@pytest.fixture
def link() -> Iterator[Link]:
    """A namespace joined to this one by a veth pair with a /30 of its own; removed afterwards."""
    need("ip netns", can_make_namespaces(), "creating network namespaces needs root and iproute2")
    tag = secrets.token_hex(3)
    octet = int(tag[:2], 16) % 250 + 1
    netns, outside, inside = f"tp-edge-{tag}", f"tpo{tag}", f"tpi{tag}"
    hub_ip, edge_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    ip("netns", "add", netns)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", netns)
        ip("addr", "add", f"{hub_ip}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", netns, "addr", "add", f"{edge_ip}/30", "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        yield Link(netns, outside, hub_ip, edge_ip)
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)


# Run inside the namespace while the link is down: the host's own events, then its own audit count.
GENERATOR = textwrap.dedent("""
    import asyncio, json, sys
    import nats
    from nats.js.errors import NotFoundError
    from tuxpilot.protocol.models import Event

    async def main(url, creds, host, first, last, expected):
        nc = await nats.connect(url, user_credentials=creds, inbox_prefix=f"_INBOX_tuxpilot-{host}-operator")
        js = nc.jetstream()
        for n in range(first, last):
            event = Event.new("test.tick", host, value=n)
            await js.publish(f"tuxpilot.evt.{host}.test.tick", event.to_json(), headers={"Nats-Msg-Id": event.id})
        for _ in range(600):
            seq, count = 1, 0
            while True:
                try:
                    msg = await js.get_msg("tuxpilot_audit", seq=seq, subject=f"tuxpilot.result.{host}.>", next=True)
                except NotFoundError:
                    break
                count, seq = count + 1, msg.seq + 1
            if count >= expected:
                break
            await asyncio.sleep(0.1)
        print(count)
        await nc.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])))
""")


async def until_serving(nc: Client, subject: str, limit: float) -> None:
    """Until the agent in the namespace serves `subject` (its gate and its plugin are up)."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        try:
            await nc.request(subject, b"{}", timeout=5)
            return
        except (NoRespondersError, NatsTimeout):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.timeout(300)
async def test_leaf_host_across_a_real_network_cut(tmp_path: Path, link: Link) -> None:
    port, leaf_port = free_ports(2)
    folder = tmp_path / "fleet"
    admin.init(folder, urls=[f"nats://{link.hub_ip}:{port}"], ports=[port], leaf_port=leaf_port,
               leaf_urls=[f"nats-leaf://{link.hub_ip}:{leaf_port}"])
    fleet, _ = admin.enroll(folder, HOST, {"role": "edge"}, leaf=True)
    extra = (admin.operator_block(fleet, tmp_path / "hub" / "jwt")
             + f'leafnodes {{ listen: "{link.hub_ip}:{leaf_port}" }}\n')
    hub_server = NatsServer(tmp_path / "hub", host=link.hub_ip, port=port, domain=HUB_DOMAIN, extra_config=extra)
    enrollment = member.load_enrollment(folder / "hosts" / f"{HOST}.json")
    state = tmp_path / f"state-{HOST}"
    # Pings every second: the leaf notices the cut link within seconds, not the default two minutes.
    leaf_server = NatsServer(tmp_path / "leaf", host=link.edge_ip, port=4222, domain=leaf_domain(HOST),
                             netns=link.netns, extra_config='ping_interval: "1s"\nping_max: 2\n'
                             + leaf.leaf_block(enrollment, member.write_creds(state, enrollment, "leaf")))
    host_cfg = tmp_path / f"{HOST}.toml"
    host_cfg.write_text(textwrap.dedent(f"""
        host_id = "{HOST}"
        state_dir = "{state}"
        [nats]
        url = "{leaf_server.url}"
        reconnect_wait_s = 0.2
        [monitor]
        enabled = false
        [gate]
        cooldown_s = 0
        [fleet]
        enrollment = "{folder / 'hosts' / f'{HOST}.json'}"
        labels = {{ role = "edge" }}
        [[rules]]
        name = "tick"
        events = ["test.tick"]
        [[rules.actions]]
        plugin = "sysmon"
        action = "top_processes"
    """))
    operator_creds = member.write_creds(state, enrollment, "operator")
    generator = tmp_path / "generate.py"
    generator.write_text(GENERATOR)
    agent: subprocess.Popen[bytes] | None = None
    hub_server.start()
    leaf_server.start()
    try:
        with (tmp_path / "agent.log").open("wb") as log:
            agent = await asyncio.to_thread(
                subprocess.Popen, ["ip", "netns", "exec", link.netns, tuxpilot_exe(), "agent"], stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "TUXPILOT_CONFIG": str(host_cfg)})
        local = await connect(leaf_server.url, operator_creds, f"_INBOX_tuxpilot-{HOST}-operator")
        await until_serving(local, f"tuxpilot.act.{HOST}.sysmon.top_processes", 90)
        base = len(await records(local, HOST))  # the calls that found it serving are audited too
        for n in range(5):  # linked: the agent, running inside the namespace, acts on them
            await tick(local, n)
        await wait_records(local, HOST, base + 5, 90)
        await local.close()
        admin_nc = await connect(hub_server.url, folder / "admin.creds")
        await hub.prepare(admin_nc, fleet)
        await wait_records(admin_nc, HOST, base + 5, 60)
        await admin_nc.close()

        ip("link", "set", link.outside, "down")  # the cut: no packet crosses any more
        with pytest.raises((OSError, TimeoutError, Exception)):
            await connect(leaf_server.url, operator_creds, connect_timeout=2, max_reconnect_attempts=0)
        done = await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", link.netns, sys.executable, str(generator), leaf_server.url,
                             str(operator_creds), HOST, "5", "12", str(base + 12)], capture_output=True, text=True,
            timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert int(done.stdout.strip()) == base + 12, done.stdout  # decided and executed while cut off
        await asyncio.sleep(3)  # long past the leaf's ping limit: its link to the hub is gone
        assert any("closed" in line.lower() and "leaf" in line.lower() for line in leaf_server.output), \
            list(leaf_server.output)[-5:]

        watcher = await connect(hub_server.url, folder / "admin.creds")
        try:  # nothing crossed: the hub has only what it had before the cut
            assert len(await records(watcher, HOST)) == base + 5
        finally:
            await watcher.close()
        ip("link", "set", link.outside, "up")
        back = asyncio.get_running_loop().time()
        watcher = await connect(hub_server.url, folder / "admin.creds")
        local = await connect(leaf_server.url, operator_creds, f"_INBOX_tuxpilot-{HOST}-operator")
        try:
            await wait_records(watcher, HOST, base + 12, 150)
            caught_up = asyncio.get_running_loop().time() - back
            await asyncio.sleep(2.0)
            leaf_ids = sorted(r["id"] for r in await records(local, HOST))
            hub_ids = sorted(r["id"] for r in await records(watcher, HOST))
            assert hub_ids == leaf_ids and len(set(hub_ids)) == len(hub_ids) == base + 12, (len(hub_ids), base)
            print(f"{len(hub_ids)} records, 7 made while the link was down, each once on the hub "
                  f"{caught_up:.1f} s after the link came back")
        finally:
            await watcher.close()
            await local.close()
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        leaf_server.stop()
        hub_server.stop()
