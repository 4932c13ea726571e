"""The hostile packages of the marketplace, sent for real to a real agent (`tuxpilot plugin install FILE`
against `tuxpilot up`) and published to the fleet registry: each is refused with one line, the agent keeps
running, and nothing is written outside the agent's temporary folder (its installed tree, plugin folders,
credentials and the paths the packages aim at are as they were)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from tuxpilot.pdk import keys, package

from tests.e2e.test_install import Up, hello, signer, up  # noqa: F401  (fixtures)
from tests.test_package import MANIFEST, entry, forge, gzip_bomb, make_plugin, raw_tar, signature, signed_members

pytestmark = pytest.mark.slow


def snapshot(state: Path) -> set[str]:
    """What the agent has written outside its server's store: installed plugins, plugin folders, credentials."""
    return {str(p.relative_to(state)) for part in ("installed", "plugins", "credentials", "keys")
            for p in (state / part).rglob("*")}


def hostile(tmp: Path, publisher: keys.Signer) -> dict[str, tuple[Path, str]]:
    """Each hostile package, and the reason it must be refused with."""
    files = {"plugin.toml": MANIFEST.encode(), "plugin.py": b"print('hi')\n"}
    made: dict[str, tuple[Path, str]] = {}

    def add(name: str, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str) -> None:
        made[name] = (forge(tmp / f"{name}.tpkg", members), reason)

    good = package.build(make_plugin(tmp / "src"), tmp / "good", publisher)
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    add("tampered", [(m, d.replace(b"hello')", b"pwned')") if m.name == "plugin/plugin.py" else d)
                     for m, d in members], "tampered: 'plugin.py' does not match its SHA-256")
    mallory = keys.Signer.generate("acme")
    made["untrusted"] = (package.build(make_plugin(tmp / "src2"), tmp / "untrusted", mallory),
                         f"signed by key {mallory.id} (claims to be 'acme'), which this host does not trust")
    traversal = signed_members(publisher, files)
    traversal.insert(2, entry("../../etc/cron.d/x", b"* * * * * root id > /tmp/owned\n"))
    add("traversal", traversal, "path traversal '../../etc/cron.d/x'")
    add("traversal-signed", signed_members(publisher, {**files, "../../etc/cron.d/x": b"* * * * * root id\n"}),
        "the file list names path traversal '../../etc/cron.d/x'")
    absolute = signed_members(publisher, files)
    absolute.append(entry("/etc/cron.d/x", b"boom"))
    add("absolute", absolute, "absolute path '/etc/cron.d/x'")
    link = signed_members(publisher, files)
    link[2:2] = [entry("plugin/lib", type=tarfile.SYMTYPE, linkname="../../../../etc"),
                 entry("plugin/lib/cron.d/x", b"boom")]
    add("symlink", link, "symlink entry 'plugin/lib' -> '../../../../etc'")
    future = MANIFEST.replace('api_version = "1"', 'api_version = "7"')
    add("future", signed_members(publisher, {**files, "plugin.toml": future.encode()}),
        "needs plugin API version 7; this TuxPilot speaks 1")
    needy = MANIFEST.replace('[{ name = "sh" }]', '[{ name = "frobnicate", version = ">=2" }]')
    made["unmet"] = (package.build(make_plugin(tmp / "src3", needy), tmp / "unmet", publisher),
                     "needs command frobnicate >=2, not found on")
    # 300 MiB of zeros in ~300 KiB, honestly listed and signed.
    import hashlib
    import json

    from tuxpilot.pdk.package import canonical

    size, zeros = 300 << 20, hashlib.sha256()
    for _ in range(300):
        zeros.update(b"\0" * (1 << 20))
    stmt = json.loads(canonical({"format": "tuxpilot-package", "format_version": 1, "name": "greeter",
                                 "version": "1.2.0", "files": []}))
    stmt["files"] = [{"path": "a-zeros", "size": size, "sha256": zeros.hexdigest(), "executable": False},
                     *({"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "executable": False}
                       for p, d in sorted(files.items()))]
    data = canonical(stmt)
    header = tarfile.TarInfo("plugin/a-zeros")
    header.size = size
    head = raw_tar([entry(package.STATEMENT, data), entry(package.SIGNATURE, signature(publisher, data))])
    (tmp / "bomb.tpkg").write_bytes(gzip_bomb(head + header.tobuf(tarfile.USTAR_FORMAT), 300))
    made["bomb"] = (tmp / "bomb.tpkg", "unpacks to 314573097 bytes, more than the cap (268435456)")
    return made


def test_hostile_packages_through_a_real_agent(up: Up, signer: keys.Signer, tmp_path: Path) -> None:  # noqa: F811
    packages = hostile(tmp_path / "made", signer)
    before = snapshot(up.state)
    agent_pid = up.proc.pid
    for name, (file, reason) in packages.items():
        done = up.cli("plugin", "install", str(file))
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and reason in lines[0], (name, done.stderr, done.stdout)
        assert snapshot(up.state) == before, name
    for target in (up.state / "installed" / "etc", up.state / "etc", Path("/etc/cron.d/x"), Path("/tmp/owned")):
        assert not target.exists(), target
    assert up.proc.poll() is None and up.proc.pid == agent_pid
    # The registry takes none of them either (publishing checks integrity, signatures and entries too).
    for name in ("tampered", "traversal", "absolute", "symlink", "bomb", "future"):
        file, reason = packages[name]
        done = up.cli("plugin", "publish", str(file))
        assert done.returncode != 0 and reason in done.stderr, (name, done.stderr)
    assert up.cli("plugin", "search").returncode == 1  # nothing was published
    # A good package still installs afterwards.
    good = package.build(hello(tmp_path, "0.1.0"), tmp_path / "fine", signer)
    done = up.cli("plugin", "install", str(good))
    assert done.returncode == 0 and "installed hello 0.1.0" in done.stdout, done.stderr + up.output()
