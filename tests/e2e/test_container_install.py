"""A container plugin through the marketplace, on a real Docker engine and a real `tuxpilot up`: packaged
with its Dockerfile, verified, installed (the agent builds the package's image offline, even over an image
the engine already holds under that name), serving through the gate hardened, updated (the old version's
image goes), removed (no container, no image left). Refused with one line: a package naming an image
that is not its own, a tarball that would re-point other tags, an install on a host without an engine, and
`plugin run` of a container plugin."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuxpilot.pdk import keys, package
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.runtimes.container import LABEL_HOST, LABEL_PLUGIN, ImageError, ensure_image

from tests.conftest import need
from tests.e2e.test_install import HOST, Up

pytestmark = pytest.mark.slow

BOXED = Path(__file__).resolve().parent.parent / "plugins" / "boxed"
BASE_IMAGE = os.environ.get("TUXPILOT_IMAGE", "tuxpilot:dev")


def manifest(version: str, image: str | None = None) -> str:
    """The manifest the package carries: the one the host runs the image with."""
    return f"""name = "boxed"
version = "{version}"
description = "A container plugin"
category = "development"
runtime = "container"
image = "{image or f'tuxpilot-plugin-boxed:{version}'}"
entry_point = "Dockerfile"
api_version = "1"
subscribes = ["boxed.poke"]
[actions.echo]
timeout_s = 10
[limits]
memory_mb = 160
processes = 64
"""


def boxed(tmp: Path, version: str, image: str | None = None) -> Path:
    """The boxed test plugin as a package folder: the host's manifest, the image's own (`image.toml`: a
    Python plugin, which file to import), the code, and a Dockerfile built on TuxPilot's image."""
    folder = tmp / f"boxed-{version}"
    folder.mkdir()
    shutil.copy(BOXED / "plugin.py", folder / "plugin.py")
    shutil.copy(BOXED / "plugin.toml", folder / "image.toml")
    (folder / "plugin.toml").write_text(manifest(version, image))
    (folder / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nCOPY image.toml /plugin/plugin.toml\nCOPY plugin.py /plugin/\n"
        'CMD ["python3", "-m", "tuxpilot.sdk.process", "/plugin"]\n')
    return folder


def engine() -> Any:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
        client.images.get(BASE_IMAGE)
        client.images.get("tuxpilot-test-busybox:latest")
    except Exception as exc:
        need("a Docker engine with TuxPilot's image", False, f"{os.environ.get('DOCKER_HOST')}: {exc} "
             "(`.ci/docker-engine.sh start`, `images/build.sh tuxpilot`)")
    return client


def has(client: Any, image: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(image).id)
    except docker.errors.ImageNotFound:
        return None


def containers(client: Any) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": [f"{LABEL_HOST}={HOST}",
                                                                     f"{LABEL_PLUGIN}=boxed"]}))


@contextlib.contextmanager
def agent(tmp: Path) -> Iterator[tuple[Up, keys.Signer]]:
    """A real `tuxpilot up` that trusts a fresh publisher key."""
    conf = tmp / "host.toml"
    conf.write_text("run_plugins = []\n")
    up = Up(tmp, conf)
    try:
        publisher = keys.Signer.generate("acme")
        keys.TrustStore(up.state / "keys" / "trusted").trust(publisher.public)
        yield up, publisher
    finally:
        up.proc.terminate()
        up.proc.wait(timeout=30)


def test_a_container_package_installs_serves_updates_and_leaves_nothing(tmp_path: Path) -> None:
    with agent(tmp_path) as (up, signer):
        serve_update_remove(up, signer, tmp_path)


def serve_update_remove(up: Up, signer: keys.Signer, tmp_path: Path) -> None:
    client = engine()
    decoy = client.images.get("tuxpilot-test-busybox:latest")
    out = tmp_path / "dist"
    try:
        v1 = package.build(boxed(tmp_path, "1.0.0"), out, signer)
        done = up.cli("plugin", "verify", str(v1))
        assert done.returncode == 0 and "verified" in done.stdout, done.stdout + done.stderr
        # Whatever the engine holds under the package's image name is not what runs: the package's own build is.
        decoy.tag("tuxpilot-plugin-boxed:1.0.0")
        done = up.cli("plugin", "install", str(v1))
        assert done.returncode == 0 and "installed boxed 1.0.0" in done.stdout, done.stderr + up.output()
        assert has(client, "tuxpilot-plugin-boxed:1.0.0") not in (None, decoy.id)
        called = up.cli("call", HOST, "boxed", "echo", '{"text": "hi"}')
        assert called.returncode == 0, called.stdout + called.stderr
        data = json.loads(called.stdout)["data"]
        assert data["cap_eff"] == "0000000000000000" and data["no_new_privs"] == "1", data
        assert data["root_write"] == "EROFS" and data["version"] == "1.0.0", data
        assert [c.status for c in containers(client)] == ["running"]

        # `plugin run` of a container plugin: one line, no traceback.
        ran = up.cli("plugin", "run", str(boxed(tmp_path, "9.0.0")))
        assert ran.returncode == 2 and "container plugin, which only the agent runs" in ran.stderr, ran.stderr
        assert "Traceback" not in ran.stderr and len(ran.stderr.strip().splitlines()) == 1, ran.stderr

        # An update builds the new version's image and drops the old one's.
        done = up.cli("plugin", "update", str(package.build(boxed(tmp_path, "1.0.1"), out, signer)))
        assert done.returncode == 0 and "updated boxed 1.0.1" in done.stdout, done.stderr + up.output()
        called = up.cli("call", HOST, "boxed", "echo", "{}")
        assert json.loads(called.stdout)["data"]["version"] == "1.0.1", called.stdout + called.stderr
        assert has(client, "tuxpilot-plugin-boxed:1.0.0") is None

        # Removed: no container, no image.
        done = up.cli("plugin", "remove", "boxed")
        assert done.returncode == 0 and "grants and image tuxpilot-plugin-boxed:1.0.1" in done.stdout, done.stderr
        assert containers(client) == [] and has(client, "tuxpilot-plugin-boxed:1.0.1") is None
        assert "plugin.image_removed" in up.output()

        # A package naming an image that is not its own (here one the engine has: a tag anyone who loads
        # images can re-point) is refused by the agent itself, not only by `plugin package`.
        other = boxed(tmp_path, "2.0.0", image="tuxpilot-test-busybox:latest")
        own = re.escape("a packaged container plugin's image is tuxpilot-plugin-boxed:2.0.0")
        with pytest.raises(ConfigError, match=own):
            package.build(other, out, signer)
        original = package.image_problem
        package.image_problem = lambda m: None  # type: ignore[assignment]  # a publisher's own tool
        try:
            forged = package.build(other, out, signer)
        finally:
            package.image_problem = original
        with pytest.raises(package.PackageRefused, match=own):  # what a registry checks on publish
            package.inspect(forged)
        done = up.cli("plugin", "install", str(forged))
        assert done.returncode == 1, done.stdout + done.stderr
        assert ("install: package.tpkg: a packaged container plugin's image is tuxpilot-plugin-boxed:2.0.0 "
                "(made from the package's own Dockerfile), not tuxpilot-test-busybox:latest") in done.stderr
        assert has(client, "tuxpilot-test-busybox:latest") == decoy.id
        assert up.proc.poll() is None
    finally:
        for tag in ("tuxpilot-plugin-boxed:1.0.0", "tuxpilot-plugin-boxed:1.0.1"):
            with contextlib.suppress(Exception):
                client.images.remove(tag)
        client.close()


def test_a_tarball_that_would_re_point_other_tags_is_not_loaded(tmp_path: Path) -> None:
    """`docker load` re-points every tag its tarball names: one naming more than the plugin's image (here
    TuxPilot's own base) is refused before it is loaded."""
    import structlog
    from tuxpilot.protocol.manifest import load

    client = engine()
    busybox = client.images.get("tuxpilot-test-busybox:latest")
    mine = f"tuxpilot-plugin-boxed:{os.getpid()}"
    busybox.tag(mine)
    try:
        folder = tmp_path / "boxed"
        folder.mkdir()
        (folder / "plugin.toml").write_text(manifest("1.0.0", mine).replace('"Dockerfile"', '"image.tar"'))
        with (folder / "image.tar").open("wb") as f:
            for chunk in client.api.get_image(mine):
                f.write(chunk)
        ensure_image(folder, load(folder), structlog.get_logger("test"), fresh=True)  # its own tag alone: loaded
        base_before = has(client, BASE_IMAGE)
        # The same tarball, its manifest.json naming TuxPilot's base image too.
        with tarfile.open(folder / "image.tar") as src, tarfile.open(tmp_path / "two.tar", "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member) if member.isfile() else None
                if member.name == "manifest.json" and data is not None:
                    doc = json.loads(data.read())
                    doc[0]["RepoTags"] = [mine, BASE_IMAGE]
                    raw = json.dumps(doc).encode()
                    member.size, data = len(raw), io.BytesIO(raw)
                dst.addfile(member, data)
        (tmp_path / "two.tar").replace(folder / "image.tar")
        with pytest.raises(ImageError, match=r"not tuxpilot-plugin-boxed:\S+ alone"):
            ensure_image(folder, load(folder), structlog.get_logger("test"), fresh=True)
        assert has(client, BASE_IMAGE) == base_before
    finally:
        with contextlib.suppress(Exception):
            client.images.remove(mine)
        client.close()


def test_no_engine_no_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose Docker engine does not answer refuses a container package with one line (the dependency
    check of the runtime), and installs nothing."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with agent(tmp_path) as (up, publisher):
        built = package.build(boxed(tmp_path, "1.0.0"), tmp_path / "dist", publisher)
        done = up.cli("plugin", "install", str(built))
        assert done.returncode == 1, done.stdout + done.stderr
        assert (f"boxed 1.0.0: runtime container cannot run here: no Docker engine answers at "
                f"unix://{tmp_path}/no-engine.sock") in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (up.state / "installed" / "boxed").exists()
