"""`compose.yaml` really runs a fleet: Debian's docker-compose brings up, from the image built here offline
(`images/build.sh`), a 3-node NATS cluster in operator mode and two agent hosts enrolled with `tuxpilot
fleet`; one fleet-wide call is answered by every agent container; everything is torn down after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, tuxpilot_exe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("TUXPILOT_IMAGE", "tuxpilot:dev")
HOSTS = ("web-1", "web-2")


def free_run(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65000:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise AssertionError("no free run of ports")


def compose_env(fleet: Path) -> dict[str, str]:
    return {**os.environ, "TUXPILOT_FLEET_DIR": str(fleet), "TUXPILOT_IMAGE": IMAGE}


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    compose = shutil.which("docker-compose")
    need("docker-compose", compose is not None, "apt-get install docker-compose")
    assert compose is not None
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=10)
        client.images.get(IMAGE)
    except Exception as exc:
        need(IMAGE, False, f"{exc}; build it with `images/build.sh tuxpilot` (.ci/run does)")
    name = f"tpfleet{uuid.uuid4().hex[:8]}"
    argv = [compose, "-f", str(REPO / "compose.yaml"), "-p", name]
    fleet = tmp_path / "fleet"
    try:
        yield argv, fleet
    finally:
        subprocess.run([*argv, "down", "-v", "--remove-orphans", "-t", "5"], env=compose_env(fleet),
                       capture_output=True, timeout=120)
        left = client.containers.list(all=True, filters={"label": f"com.docker.compose.project={name}"})
        client.close()
        assert not left, f"containers left behind: {[c.name for c in left]}"


@pytest.mark.timeout(400)  # bringing a fleet up and down; ~32 s here
def test_compose_runs_a_fleet_that_answers_a_fleet_wide_call(project: tuple[list[str], Path]) -> None:
    compose, fleet = project
    tux = tuxpilot_exe()
    env = compose_env(fleet)
    port, cluster_port = free_run(3), free_run(3)
    subprocess.run([tux, "fleet", "init", "--dir", str(fleet), "--cluster", "3", "--port", str(port),
                    "--cluster-port", str(cluster_port)], check=True, capture_output=True, timeout=60)
    # The servers first: an enrolment is then pushed to the running cluster.
    subprocess.run([*compose, "up", "-d", "nats-0", "nats-1", "nats-2"], env=env, check=True, capture_output=True,
                   timeout=120)
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in range(port, port + 3))
    for host in HOSTS:
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run([tux, "fleet", "enroll", host, "--dir", str(fleet), "--label", "role=web"],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and "account updated on the servers" in done.stdout:
                break
            assert time.monotonic() < deadline, f"enrolling {host}: {done.stdout}{done.stderr}"
            time.sleep(1)
    subprocess.run([*compose, "up", "-d"], env=env, check=True, capture_output=True, timeout=120)

    call = [tux, "call", "--all", "sysmon", "top_processes", '{"n": 2}', "--fleet-dir", str(fleet), "--timeout", "5"]
    call_env = {**os.environ, "TUXPILOT_NATS_URL": urls, "TUXPILOT_NATS_CREDS": str(fleet / "admin.creds")}
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(call, env=call_env, capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            break
        if time.monotonic() > deadline:
            logs = subprocess.run([*compose, "logs", "--tail", "20"], env=env, capture_output=True, text=True)
            raise AssertionError(f"the fleet did not answer:\n{done.stdout}{done.stderr}\n{logs.stdout[-4000:]}")
        time.sleep(2)
    assert "2 of 2 targeted host(s) answered" in done.stdout
    for host in HOSTS:
        assert host in done.stdout
