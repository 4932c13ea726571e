"""The `container` runtime on a real Docker engine: a plugin shipped as an image (built here offline from
TuxPilot's image, `images/build.sh`) runs hardened as its own user, serves an action through the gate,
turns an event into a proposal, is restarted after `docker kill`, leaves no container behind when the
agent stops (or is SIGKILLed), and is believed only as the HOST's manifest describes it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from tuxpilot.agent.app import Agent
from tuxpilot.agent.config import load_config
from tuxpilot.bus import auth
from tuxpilot.bus.plugin_state import read_states
from tuxpilot.protocol import launch
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import load
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import MSG_ID_HEADER, Subjects
from tuxpilot.runtimes.catalog import RUNTIMES
from tuxpilot.runtimes.container import (
    LABEL_HOST,
    LABEL_PLUGIN,
    SPEC,
    ImageError,
    container_name,
    ensure_image,
    host_spec,
    network_mode,
)

from tests.conftest import need, tuxpilot_exe

HERE = Path(__file__).resolve().parent
BOXED = HERE / "plugins" / "boxed"
BASE_IMAGE = os.environ.get("TUXPILOT_IMAGE", "tuxpilot:dev")
IMAGE = "tuxpilot-test-boxed:dev"
HOST = "box-host"

# The manifest the HOST loads: only `echo` (the image's own also claims `wipe` and version 6.6.6).
HOST_MANIFEST = f"""name = "boxed"
version = "1.0.0"
description = "A container plugin"
category = "development"
runtime = "container"
image = "{IMAGE}"
entry_point = "image.tar"
api_version = "1"
subscribes = ["boxed.poke"]

[actions.echo]
timeout_s = 10
[actions.echo.params]
type = "object"
properties = {{ text = {{ type = "string", maxLength = 20 }}, probe = {{ type = "string" }} }}

[limits]
memory_mb = 160
processes = 64
"""


def test_a_container_manifest_names_its_image_and_only_it_does(tmp_path: Path) -> None:
    folder = host_folder(tmp_path)
    assert load(folder).image == IMAGE
    (folder / "plugin.toml").write_text(HOST_MANIFEST.replace(f'image = "{IMAGE}"\n', ""))
    with pytest.raises(ConfigError, match="runtime 'container' and `image` go together"):
        load(folder)
    (folder / "plugin.toml").write_text(HOST_MANIFEST.replace('runtime = "container"', 'runtime = "python"'))
    with pytest.raises(ConfigError, match="go together"):
        load(folder)


def test_the_manifest_limits_become_the_containers_and_the_flags_harden_it(tmp_path: Path) -> None:
    folder = host_folder(tmp_path)
    manifest = load(folder)
    launch_ = RUNTIMES["container"].launch(folder, manifest, {"memory_mb": 160, "processes": 64, "cpu_s": 30,
                                                              "open_files": 256}, os.defpath)
    assert launch_.as_agent and launch_.rlimits == {}  # the limits are the container's, not this process's
    env = {SPEC: launch_.env[SPEC], launch.NATS_USER_FILE: str(tmp_path / "boxed.json"), "PYTHONPATH": "/host",
           "DOCKER_HOST": "unix:///x", launch.NATS_URL: "nats://127.0.0.1:4222,nats://127.0.0.1:4223"}
    handed = json.loads(host_spec(launch_.env[SPEC], host=HOST, plugin="boxed", account=None,
                                  credential=tmp_path / "boxed.json", cpus=0.5, network="none", env=env))
    assert handed["image"] == IMAGE and handed["relay"]
    assert handed["upstreams"] == "nats://127.0.0.1:4222,nats://127.0.0.1:4223"  # the relay's way out
    options = handed["options"]
    assert options["read_only"] and options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges"] and options["init"]
    assert options["mem_limit"] == options["memswap_limit"] == 160 * 2**20
    assert options["pids_limit"] == 64 and options["nano_cpus"] == 500_000_000
    assert {(u["name"], u["soft"], u["hard"]) for u in options["ulimits"]} == {("cpu", 30, 30), ("nofile", 256, 256)}
    assert options["user"] == f"{os.getuid()}:{os.getgid()}" and options["name"] == container_name(HOST, "boxed")
    assert options["volumes"] == {str(tmp_path / "boxed.json"): {"bind": "/run/tuxpilot/credentials.json",
                                                                  "mode": "ro"}}
    inside = options["environment"]
    assert inside[launch.NATS_USER_FILE] == "/run/tuxpilot/credentials.json"
    assert "PYTHONPATH" not in inside and "DOCKER_HOST" not in inside and SPEC not in inside
    assert json.loads(inside[launch.MANIFEST])["version"] == "1.0.0"
    # No network of its own: the bus through the relay into its namespace.
    assert options["network_mode"] == "none" and inside[launch.NATS_URL] == "nats://127.0.0.1:4222"


def test_only_network_access_gives_a_container_the_hosts_network() -> None:
    root = os.geteuid() == 0
    assert network_mode(granted_network=False, tls=False) == ("none" if root else "host")
    assert network_mode(granted_network=True, tls=False) == "host"
    assert network_mode(granted_network=False, tls=True) == "host"  # the certificate names the host's address


def docker_client() -> Any:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        need("a Docker engine", False, f"{os.environ.get('DOCKER_HOST', 'the default socket')}: {exc}")
    return client


def test_an_image_the_engine_lacks_is_loaded_or_built_from_the_plugins_entry_point(tmp_path: Path) -> None:
    """`docker load` of the entry point when the engine lacks the image, or `docker build` when it is a
    Dockerfile; a tarball of another image, none, or a build that fails is one refusal (the plugin is
    not started in a loop)."""
    import docker.errors
    import structlog

    client = docker_client()
    try:
        busybox = client.images.get("tuxpilot-test-busybox:latest")
    except docker.errors.ImageNotFound:
        need("tuxpilot-test-busybox", False, "`.ci/docker-engine.sh start` builds it")
    tag = f"tuxpilot-test-load:{os.getpid()}"
    folder = host_folder(tmp_path)
    busybox.tag(tag)
    try:
        with (folder / "image.tar").open("wb") as out:
            for chunk in client.api.get_image(tag):  # the tarball names this tag
                out.write(chunk)
        client.images.remove(tag)
        (folder / "plugin.toml").write_text(HOST_MANIFEST.replace(IMAGE, tag))
        log = structlog.get_logger("test")
        ensure_image(folder, load(folder), log)
        assert tag in client.images.get(tag).tags
        (folder / "plugin.toml").write_text(HOST_MANIFEST.replace(IMAGE, "tuxpilot-test-load:other"))
        with pytest.raises(ImageError, match=r"holds .*tuxpilot-test-load.*, not tuxpilot-test-load:other"):
            ensure_image(folder, load(folder), log)
        (folder / "image.tar").unlink()
        with pytest.raises(ImageError, match=r"the engine has no image tuxpilot-test-load:other and .*image\.tar"):
            ensure_image(folder, load(folder), log)
        # A Dockerfile as the entry point: built with the plugin's folder as context, without network.
        (folder / "Dockerfile").write_text(f'FROM {tag}\nCOPY plugin.toml /plugin.toml\nCMD ["sh"]\n')
        built = f"tuxpilot-test-built:{os.getpid()}"
        (folder / "plugin.toml").write_text(
            HOST_MANIFEST.replace(IMAGE, built).replace('entry_point = "image.tar"', 'entry_point = "Dockerfile"'))
        ensure_image(folder, load(folder), log)
        client.images.remove(built)
        (folder / "Dockerfile").write_text(f"FROM {tag}\nRUN wget -q -T 2 http://127.0.0.1:1/ \n")
        with pytest.raises(ImageError, match=f"building {built} from Dockerfile failed"):
            ensure_image(folder, load(folder), log)
    finally:
        for image in (tag, f"tuxpilot-test-built:{os.getpid()}"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(image)
        client.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """The engine, with the test plugin's image built offline from TuxPilot's image."""
    client = docker_client()
    import docker.errors

    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        need(BASE_IMAGE, False, "build it with `images/build.sh tuxpilot` (.ci/run does)")
    client.images.build(path=str(BOXED), tag=IMAGE, buildargs={"BASE": BASE_IMAGE}, network_mode="none", rm=True)
    yield client
    client.close()


def ours(client: Any) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_HOST}={HOST}"}))


@dataclass
class Rig:
    agent: Agent
    operator: Client
    agent_nc: Client
    subjects: Subjects

    async def call(self, action: str, params: dict[str, Any], timeout: float = 15) -> tuple[dict[str, Any], Any]:
        msg = await self.operator.request(self.subjects.act("boxed", action), json.dumps(params).encode(),
                                          timeout=timeout)
        return json.loads(msg.data), msg.headers


async def _connect(url: str, creds_file: Path) -> Client:
    creds = launch.CredentialFile.model_validate_json(await asyncio.to_thread(creds_file.read_text))
    return await nats.connect(url, user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix)


def host_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins" / "boxed"
    folder.mkdir(parents=True)
    (folder / "plugin.toml").write_text(HOST_MANIFEST)
    return folder


def config_env(tmp_path: Path) -> dict[str, str]:
    return {
        launch.HOST_ID: HOST,
        launch.STATE_DIR: str(tmp_path / "state"),
        "TUXPILOT_PLUGIN_DIRS": str(tmp_path / "plugins"),
        "TUXPILOT_RUN_PLUGINS": "boxed",
        "TUXPILOT_MONITOR_ENABLED": "false",
        "TUXPILOT_SUPERVISION_BACKOFF_START_S": "0.2",
    }


async def until_answers(rig: Rig, limit: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        try:
            doc, _ = await rig.call("echo", {"text": "hi"}, timeout=5)
            if doc.get("status") == "ok":
                return doc
        except (TimeoutError, nats.errors.Error):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the container plugin did not answer through the gate")
        await asyncio.sleep(0.3)


@pytest.fixture
async def rig(engine: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    host_folder(tmp_path)
    config = load_config(environ=config_env(tmp_path))
    agent = Agent(config)
    await agent.start()
    subjects = Subjects.of(config)
    state = tmp_path / "state"
    operator = await _connect(agent.url, auth.credential_file(state, auth.operator_user(subjects).name))
    agent_nc = await _connect(agent.url, auth.credential_file(state, auth.agent_user(subjects).name))
    try:
        yield Rig(agent, operator, agent_nc, subjects)
    finally:
        await operator.close()
        await agent_nc.close()
        await agent.stop()


@pytest.mark.slow
async def test_a_container_plugin_serves_hardened_and_as_the_host_manifest_says(rig: Rig, engine: Any) -> None:
    doc = await until_answers(rig)
    data = doc["data"]
    assert data["params"] == {"text": "hi"}
    # No network but the bus (network_access not granted): a listener on the host's loopback, which a
    # process plugin or a container on the host's network reaches, is not there from inside.
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        probed, _ = await rig.call("echo", {"probe": f"127.0.0.1:{port}"})
        assert probed["data"]["probe"] == "ECONNREFUSED", probed
    finally:
        listener.close()
    # Hardened: no capabilities, no_new_privs, a read-only root, the manifest's limits as cgroup limits.
    assert int(data["cap_eff"], 16) == 0
    assert data["no_new_privs"] == "1"
    assert data["root_write"] == "EROFS"
    assert int(data["memory_limit"]) == 160 * 2**20
    assert data["pids_limit"] == "64"
    # Never the engine's root; as root the host gives the container the plugin's own user.
    assert data["uid"] != 0 or os.geteuid() != 0
    if os.geteuid() == 0:
        assert data["uid"] == pwd.getpwnam("tuxpilot-p-boxed").pw_uid
    # The plugin's own credential file, mounted read-only; no secret of the agent's in its environment.
    assert data["credential"] == "/run/tuxpilot/credentials.json"
    assert not {"TUXPILOT_NATS_CREDS", "TUXPILOT_NATS_PASSWORD", "DOCKER_HOST", "VIRTUAL_ENV"} & set(data["env"])
    # It runs and announces the HOST's manifest, not the image's (6.6.6, with `wipe`).
    assert data["version"] == "1.0.0"
    info = await rig.operator.request("$SRV.INFO.boxed", b"", timeout=5)
    announced = json.loads(info.data)
    assert announced["version"] == "1.0.0"
    assert {e["name"] for e in announced["endpoints"]} == {"echo"}
    with pytest.raises(nats.errors.NoRespondersError):  # the gate serves the host manifest's actions only
        await rig.call("wipe", {})
    # The host's params schema holds, whatever the image declares.
    refused, _ = await rig.call("echo", {"text": "x" * 50})
    assert refused["code"] == "invalid_params"

    # An event becomes a proposal, which the gate executes in the container.
    results = await rig.agent_nc.subscribe(rig.subjects.result("boxed", "echo"))
    event = Event.new("boxed.poke", HOST, source="agent")
    await rig.agent_nc.jetstream().publish(rig.subjects.event(event.type), event.to_json(),
                                           headers={MSG_ID_HEADER: event.id})
    while True:
        record = json.loads((await results.next_msg(timeout=30)).data)
        if record.get("source") != "operator":
            break
    assert record["status"] == "ok" and record["data"]["params"] == {"from": event.id}

    # `docker kill`: the host restarts it (a new container), and it answers again.
    first = engine.containers.get(container_name(HOST, "boxed"))
    assert first.labels[LABEL_PLUGIN] == "boxed"
    first.kill()
    await asyncio.sleep(0.5)
    await until_answers(rig)
    second = engine.containers.get(container_name(HOST, "boxed"))
    assert second.id != first.id
    state = (await read_states(rig.agent_nc.jetstream(), rig.subjects))[f"{HOST}.boxed"]
    assert state.restarts >= 1 and state.last_exit is not None
    assert state.last_exit.exit_code == 137  # the engine's SIGKILL

    # Stopping the agent leaves no container behind.
    await rig.agent.stop()
    assert ours(engine) == []


@pytest.mark.slow
async def test_a_container_that_keeps_exiting_is_a_crash_loop(engine: Any, tmp_path: Path) -> None:
    import io

    import docker.errors

    try:
        engine.images.get("tuxpilot-test-busybox:latest")
    except docker.errors.ImageNotFound:
        need("tuxpilot-test-busybox", False, "`.ci/docker-engine.sh start` builds it")
    dockerfile = b'FROM tuxpilot-test-busybox:latest\nCMD ["sh", "-c", "echo failing; exit 3"]\n'
    engine.images.build(fileobj=io.BytesIO(dockerfile), tag="tuxpilot-test-flaky:dev", network_mode="none", rm=True)
    folder = host_folder(tmp_path)
    (folder / "plugin.toml").write_text(HOST_MANIFEST.replace(IMAGE, "tuxpilot-test-flaky:dev"))
    config = load_config(environ={**config_env(tmp_path), "TUXPILOT_SUPERVISION_CRASH_LOOP_RESTARTS": "3",
                                  "TUXPILOT_SUPERVISION_BACKOFF_START_S": "0.1"})
    agent = Agent(config)
    await agent.start()
    try:
        subjects = Subjects.of(config)
        nc = await _connect(agent.url, auth.credential_file(config.state_dir, auth.agent_user(subjects).name))
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                state = (await read_states(nc.jetstream(), subjects)).get(f"{HOST}.boxed")
                if state is not None and state.state == "crash_loop":
                    break
                assert asyncio.get_running_loop().time() < deadline, f"no crash loop: {state}"
                await asyncio.sleep(0.2)
            assert state.last_exit is not None and state.last_exit.exit_code == 3  # the container's own
        finally:
            await nc.close()
    finally:
        await agent.stop()
    assert ours(engine) == []


@pytest.mark.slow
async def test_no_container_outlives_a_sigkilled_agent(engine: Any, tmp_path: Path) -> None:
    """`tuxpilot up` SIGKILLed: its container's process gets the parent-death signal and removes it."""
    host_folder(tmp_path)
    env = {**os.environ, **config_env(tmp_path)}
    up = await asyncio.create_subprocess_exec(tuxpilot_exe(), "up", env=env, stdout=asyncio.subprocess.DEVNULL,
                                              stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not [c for c in ours(engine) if c.status == "running"]:
            assert up.returncode is None, "tuxpilot up exited"
            assert asyncio.get_running_loop().time() < deadline, "no container started"
            await asyncio.sleep(0.3)
    finally:
        up.send_signal(signal.SIGKILL)
        await up.wait()
    deadline = asyncio.get_running_loop().time() + 20
    while ours(engine):
        assert asyncio.get_running_loop().time() < deadline, "a container outlived its agent"
        await asyncio.sleep(0.3)
