"""Registries of plugin packages (pdk/registry.py) and the marketplace commands (cli/market.py, cli/key.py):
a folder registry, and the fleet registry on a real nats-server with the generated authorization, where
the operator publishes, the agent fetches, and a plugin can neither plant a package nor an index entry."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
from tuxpilot.agent.config import Config, load_config
from tuxpilot.pdk import package
from tuxpilot.pdk.keys import Signer, TrustStore
from tuxpilot.pdk.registry import BusRegistry, open_registry
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import Conflict, NotFound
from tuxpilot.protocol.names import Subjects, package_index_bucket, package_key, packages_bucket

from tests.conftest import tuxpilot_exe
from tests.test_auth import Secured, secured  # noqa: F401  (the fixture)
from tests.test_package import MANIFEST, make_plugin


def build(tmp_path: Path, signer: Signer | None, *, name: str = "greeter", version: str = "1.2.0",
          description: str = "Greets people", category: str = "custom") -> Path:
    text = (MANIFEST.replace('name = "greeter"', f'name = "{name}"').replace('"1.2.0"', f'"{version}"')
            .replace('"Greets people"', f'"{description}"').replace('"custom"', f'"{category}"'))
    folder = make_plugin(tmp_path / "src" / f"{name}-{version}", text)
    return package.build(folder, tmp_path / "dist", signer)


def host_config(tmp_path: Path, **env: str) -> Config:
    return load_config(environ={"TUXPILOT_HOST_ID": "test-host", "TUXPILOT_STATE_DIR": str(tmp_path / "state"),
                                **env})


async def test_folder_registry(tmp_path: Path) -> None:
    signer = Signer.generate("acme")
    config = host_config(tmp_path, TUXPILOT_MARKETPLACE_REGISTRY="usb",
                         TUXPILOT_MARKETPLACE_REGISTRIES=json.dumps({"usb": {"path": str(tmp_path / "usb")}}))
    async with open_registry(config) as registry:
        assert registry.name == "usb" and await registry.search("") == []
        first = await registry.publish(build(tmp_path, signer, version="1.2.0"))
        await registry.publish(build(tmp_path, signer, version="1.10.0", description="Greets people, louder"))
        await registry.publish(build(tmp_path, None, name="diskwatch", version="0.3.0",
                                     description="Watches disks", category="storage"))
        assert (first.publisher, first.publisher_name, first.dangerous) == (signer.id, "acme", ["process_management"])
        for doc in (tmp_path / "usb").glob("*/*.json"):  # the index entries agree with the schema
            assert schemas.validator("package-entry").errors(json.loads(doc.read_text())) == [], doc
        # Newest of each name; words match names, descriptions and categories.
        assert [e.ref for e in await registry.search("")] == ["diskwatch@0.3.0", "greeter@1.10.0"]
        assert [e.ref for e in await registry.search("STORAGE disks")] == ["diskwatch@0.3.0"]
        assert [e.ref for e in await registry.search("greets loud")] == ["greeter@1.10.0"]
        assert (await registry.info("greeter")).version == "1.10.0"
        assert (await registry.info("greeter", "1.2.0")).sha256 == first.sha256
        with pytest.raises(NotFound, match=r"no version 9.9.9 of greeter in registry usb \(it has 1.2.0, 1.10.0\)"):
            await registry.info("greeter", "9.9.9")
        # The same file again is a no-op; other contents under a published version are refused.
        assert await registry.publish(tmp_path / "dist" / "greeter-1.2.0.tpkg") == first
        other = build(tmp_path / "again", signer, version="1.2.0", description="Something else")
        with pytest.raises(Conflict, match=r"greeter@1\.2\.0 is published in usb already"):
            await registry.publish(other)
        fetched = await registry.fetch("greeter", "1.2.0", tmp_path / "fetched")
        trust = TrustStore(tmp_path / "trusted")
        trust.trust(signer.public)
        assert package.verify(fetched, trust, allow_unsigned=False).sha256 == first.sha256
        # The registry's file swapped behind its index entry: fetch refuses it and leaves nothing.
        (tmp_path / "usb" / "greeter" / "greeter-1.10.0.tpkg").write_bytes(other.read_bytes())
        with pytest.raises(package.PackageRefused, match="does not match its index entry"):
            await registry.fetch("greeter", None, tmp_path / "fetched2")
        assert list((tmp_path / "fetched2").iterdir()) == []


async def test_fleet_registry_through_the_generated_authorization(secured: Secured, tmp_path: Path) -> None:  # noqa: F811
    signer = Signer.generate("acme")
    config = host_config(tmp_path, TUXPILOT_NATS_URL=secured.server.url)
    operator, agent = await secured.connect("operator"), await secured.connect("agent")
    plugin_errors: list[str] = []
    plugin = await secured.connect("sysmon", plugin_errors)
    try:
        async with open_registry(config, "fleet", nc=operator) as registry:
            assert isinstance(registry, BusRegistry) and registry.bucket == "tuxpilot_packages"
            assert await registry.search("") == []
            with pytest.raises(NotFound):
                await registry.info("greeter")
            published = await registry.publish(build(tmp_path, signer))
            await registry.publish(build(tmp_path, signer, version="2.0.0"))
            assert [e.ref for e in await registry.search("greets")] == ["greeter@2.0.0"]
        # The agent reads and fetches (as the installer will), and verifies what it got.
        async with open_registry(config, nc=agent) as registry:
            assert [e.version for e in await registry.entries("greeter")] == ["1.2.0", "2.0.0"]
            fetched = await registry.fetch("greeter", "1.2.0", tmp_path / "agent")
        trust = TrustStore(tmp_path / "trusted")
        trust.trust(signer.public)
        assert package.verify(fetched, trust, allow_unsigned=False).sha256 == published.sha256
        # A plugin can neither publish a package nor write an index entry.
        async with open_registry(config, nc=plugin) as registry:
            with pytest.raises(Exception):  # noqa: B017,PT011 - whichever the client raises, it is refused
                await asyncio.wait_for(registry.publish(build(tmp_path / "evil", None, version="3.0.0")), 10)
        js = plugin.jetstream(timeout=1)
        subjects = Subjects("tuxpilot", "test-host")
        key = package_key("greeter", "1.2.0")
        with pytest.raises(Exception):  # noqa: B017,PT011 - a timeout: the server dropped the publish
            await js.publish(f"$KV.{package_index_bucket(packages_bucket(subjects))}.{key}", b'{"sha256":"0"}')
        await plugin.flush()
        denied = [e.lower() for e in plugin_errors if "permissions violation" in e.lower()]
        assert any("$kv.tuxpilot_packages_index.greeter" in e for e in denied), plugin_errors
        async with open_registry(config, nc=operator) as registry:
            assert (await registry.info("greeter", "1.2.0")).sha256 == published.sha256
            assert [e.version for e in await registry.entries()] == ["1.2.0", "2.0.0"]
        # The stored object replaced behind the index (by someone who may write the bucket): fetch refuses.
        objects = await operator.jetstream().object_store("tuxpilot_packages")
        await objects.put("greeter/greeter-2.0.0.tpkg", fetched.read_bytes())
        async with open_registry(config, nc=agent) as registry:
            # Same size or not (compression decides), it is refused: by its size, else by its SHA-256.
            refused = r"greeter@2\.0\.0.*(index entry says|does not match its index entry)"
            with pytest.raises(package.PackageRefused, match=refused):
                await registry.fetch("greeter", None, tmp_path / "agent2")
    finally:
        for nc in (operator, agent, plugin):
            await nc.close()


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tuxpilot_exe(), *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.slow
def test_the_commands(secured: Secured, tmp_path: Path) -> None:  # noqa: F811
    """key new → package → verify (refused, then trusted) → publish → search → info → fetch, as typed."""
    env = {"TUXPILOT_CONFIG": "/dev/null", "TUXPILOT_HOST_ID": "test-host", "TUXPILOT_NATS_URL": secured.server.url,
           "TUXPILOT_STATE_DIR": str(secured.state), "NO_COLOR": "1", "COLUMNS": "120"}
    made = _run(env, "key", "new", "acme")
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip().splitlines()[-1]
    folder = make_plugin(tmp_path / "greeter")
    built = _run(env, "plugin", "package", str(folder), "--out", str(tmp_path / "dist"))
    assert built.returncode == 0 and "signed by acme" in built.stdout, built.stderr
    file = str(tmp_path / "dist" / "greeter-1.2.0.tpkg")
    refused = _run(env, "plugin", "verify", file)
    assert refused.returncode == 1 and "which this host does not trust" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _run(env, "key", "trust", public).returncode == 0
    verified = _run(env, "plugin", "verify", file)
    assert verified.returncode == 0, verified.stderr
    assert "publisher: acme" in verified.stdout and "trusted here" in verified.stdout
    assert "process_management  DANGEROUS" in verified.stdout and "filesystem_read\n" in verified.stdout
    published = _run(env, "plugin", "publish", file)
    assert published.returncode == 0 and "published greeter@1.2.0 to fleet" in published.stdout, published.stderr
    found = _run(env, "plugin", "search", "greets", "--json")
    assert [e["name"] for e in json.loads(found.stdout)] == ["greeter"]
    assert _run(env, "plugin", "search", "nothing-like-it").returncode == 1
    info = _run(env, "plugin", "info", "greeter@1.2.0")
    assert info.returncode == 0 and "versions: 1.2.0" in info.stdout and "DANGEROUS" in info.stdout
    missing = _run(env, "plugin", "info", "nope")
    assert missing.returncode == 1 and "no plugin 'nope' in registry fleet" in missing.stderr
    fetched = _run(env, "plugin", "fetch", "greeter", "--out", str(tmp_path / "got"))
    assert fetched.returncode == 0 and Path(fetched.stdout.strip()).read_bytes() == Path(file).read_bytes()
