"""A real 3-node nats-server cluster on loopback: streams and buckets get 3 replicas by themselves, and
SIGKILL of the events stream's leader mid-flow loses no event and runs no action twice, while the gate
and the plugin reconnect to the surviving nodes on their own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from tuxpilot.agent.config import Config, load_config
from tuxpilot.bus import connect as bus
from tuxpilot.bus.server import NatsServer
from tuxpilot.bus.streams import ensure_streams, replicas_for
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import Names, Subjects

from tests.conftest import until
from tests.test_faults import counting_plugin, publish_until_stored, start_gate

pytestmark = pytest.mark.slow


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    ports, routes = free_ports(3), free_ports(3)
    nodes = []
    for i in range(3):
        others = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in enumerate(routes) if j != i)
        extra = (f'server_name: "n{i}"\ncluster {{\n  name: "c"\n  listen: "127.0.0.1:{routes[i]}"\n'
                 f"  routes: [{others}]\n}}\n")
        nodes.append(NatsServer(tmp_path / f"n{i}", port=ports[i], extra_config=extra))
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def cluster_config(tmp_path: Path, cluster: list[NatsServer]) -> Config:
    config = load_config(environ={
        "TUXPILOT_NATS_URL": ",".join(n.url for n in cluster),
        "TUXPILOT_HOST_ID": "test-host",
        "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
    })
    config.nats.reconnect_wait_s = 0.1
    config.gate.cooldown_s = 0
    return config


async def jetstream_ready(nc: Client) -> None:
    """A new cluster answers JetStream requests once its meta leader is elected."""
    for _ in range(100):
        try:
            await nc.jetstream().account_info()
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise AssertionError("the cluster elected no JetStream leader")


async def test_three_replicas_and_a_killed_node_loses_nothing(
    cluster: list[NatsServer], cluster_config: Config
) -> None:
    config, subjects, total, crash_at = cluster_config, Subjects.of(cluster_config), 300, 120
    urls = config.nats.url or ""
    agent_nc = await bus.connect(config.nats, urls, name="agent")
    plugin_nc = await bus.connect(config.nats, urls, name="plugin")
    producer = await bus.connect(config.nats, urls, name="producer")
    await jetstream_ready(agent_nc)
    # What the agent does at start: decide the replicas from the servers it knows, then create.
    config.streams = config.streams.model_copy(update={"replicas": replicas_for(agent_nc, config.streams)})
    assert config.streams.replicas == 3
    js = agent_nc.jetstream()
    await ensure_streams(js, subjects, config.streams)
    plugin, ran = counting_plugin()
    await plugin.start(plugin_nc, config)
    registry, gate = await start_gate(agent_nc, config, plugin.manifest)
    names = Names.of(subjects)
    for stream in (names.events, names.proposals, names.audit, f"KV_{names.executions}"):
        info = await js.stream_info(stream)
        assert info.config.num_replicas == 3, stream
    events = await js.stream_info(names.events)
    assert events.cluster is not None and events.cluster.leader
    victim = next(n for n in cluster if f'"{events.cluster.leader}"' in n.extra_config)
    retries = 0
    try:
        for seq in range(total):
            if seq == crash_at:
                victim.kill()  # the events stream's leader: the worst node to lose
            event = Event.new("counter.tick", "test-host", value=seq)
            retries += await publish_until_stored(producer, subjects, event) - 1
        try:
            await until(lambda: len(ran) == total, 90, f"{total} distinct executions")
        except AssertionError as exc:
            missing = sorted(set(range(total)) - set(ran))
            states = []
            for stream, consumer in ((names.events, "counter-test-host"), (names.proposals, "gate-test-host")):
                try:
                    ci = await producer.jetstream().consumer_info(stream, consumer)
                    states.append(f"{consumer}: pending={ci.num_pending} ack_pending={ci.num_ack_pending} "
                                  f"redelivered={ci.num_redelivered} delivered={ci.delivered} ack_floor={ci.ack_floor}")
                except Exception as err:
                    states.append(f"{consumer}: {err!r}")
            raise AssertionError(f"{exc}: missing {len(missing)}: {missing[:20]}; {states}") from None
        await asyncio.sleep(1.0)  # let any duplicate show itself
        assert sorted(ran) == list(range(total)), "an event was lost"
        assert max(ran.values()) == 1, f"ran twice: {[s for s, n in ran.items() if n > 1]}"
        for nc in (agent_nc, plugin_nc, producer):
            assert nc.is_connected and nc.connected_url is not None
            assert nc.connected_url.port != victim.port
        stored = await producer.jetstream().stream_info(names.events)
        assert stored.state.messages == total
        print(f"killed={events.cluster.leader} events={total} executed={sum(ran.values())} publish_retries={retries}")
    finally:
        await gate.stop()
        await registry.stop()
        await plugin.stop()
        for nc in (agent_nc, plugin_nc, producer):
            await nc.close()
