"""Plugin packages: reproducible builds, signatures and trust, safe unpacking, and every hostile package
of the marketplace issue tried for real (each refused with one line, nothing written outside a
temporary folder)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tuxpilot.pdk import deps, package
from tuxpilot.pdk.keys import KeyRing, PublicKey, Signer, TrustStore
from tuxpilot.pdk.package import PackageRefused, canonical
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import Manifest

MANIFEST = """\
name = "greeter"
version = "1.2.0"
description = "Greets people"
category = "custom"
runtime = "python"
entry_point = "plugin.py"
api_version = "1"
permissions = ["filesystem_read", "process_management"]
dependencies = [{ name = "sh" }]

[actions.greet]
permission = "filesystem_read"
"""


def make_plugin(folder: Path, manifest: str = MANIFEST) -> Path:
    (folder / "lib").mkdir(parents=True)
    (folder / "plugin.toml").write_text(manifest)
    (folder / "plugin.py").write_text("print('hello')\n")
    (folder / "lib" / "words.txt").write_text("hello\nworld\n")
    (folder / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(folder / "run.sh", 0o755)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"junk")
    return folder


@pytest.fixture
def signer() -> Signer:
    return Signer.generate("acme")


@pytest.fixture
def trust(tmp_path: Path, signer: Signer) -> TrustStore:
    store = TrustStore(tmp_path / "trusted")
    store.trust(signer.public)
    return store


@pytest.fixture
def built(tmp_path: Path, signer: Signer) -> Path:
    return package.build(make_plugin(tmp_path / "src"), tmp_path / "out", signer)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(file: Path, trust: TrustStore, *, allow_unsigned: bool = False, **limits: int) -> str:
    """Verify and unpack `file` into a sandbox; it must be refused with one line and leave the sandbox as
    it was (no dest, no temporary folder, nothing written anywhere else under it)."""
    sandbox = file.parent / "sandbox"
    (sandbox / "a" / "b").mkdir(parents=True, exist_ok=True)
    before = snapshot(file.parent)
    lim = package.Limits(**limits) if limits else package.DEFAULT_LIMITS

    def attempt() -> None:
        verified = package.verify(file, trust, allow_unsigned=allow_unsigned, limits=lim)
        package.unpack(verified, sandbox / "a" / "b" / "dest", limits=lim)

    with pytest.raises(PackageRefused) as caught:
        attempt()
    assert snapshot(file.parent) == before
    message = caught.value.message
    assert "\n" not in message and message.startswith(file.name)
    return message


def forge(out: Path, members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """An archive with exactly these entries, as a hostile publisher would write it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return out


def entry(name: str, data: bytes = b"", **attrs: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if info.isreg() else None


def statement(files: dict[str, bytes], name: str = "greeter", version: str = "1.2.0",
              sizes: dict[str, int] | None = None) -> bytes:
    listed = [{"path": p, "size": (sizes or {}).get(p, len(d)), "sha256": hashlib.sha256(d).hexdigest(),
               "executable": False} for p, d in sorted(files.items())]
    return canonical({"format": "tuxpilot-package", "format_version": 1, "name": name, "version": version,
                      "files": listed})


def signature(signer: Signer, stmt: bytes) -> bytes:
    import base64

    return canonical({"algorithm": "ed25519", "key_id": signer.id, "publisher": signer.name,
                      "public_key": base64.b64encode(signer.public.key).decode(),
                      "signature": base64.b64encode(signer.sign(stmt)).decode()})


def signed_members(signer: Signer, files: dict[str, bytes], **kw: object) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    stmt = statement(files, **kw)  # type: ignore[arg-type]
    return [entry(package.STATEMENT, stmt), entry(package.SIGNATURE, signature(signer, stmt)),
            *(entry("plugin/" + p, d) for p, d in sorted(files.items()))]


# --- building and verifying ----------------------------------------------------------------------------


def test_build_is_reproducible(tmp_path: Path, signer: Signer) -> None:
    one = package.build(make_plugin(tmp_path / "a"), tmp_path / "out1", signer)
    second = make_plugin(tmp_path / "b")
    # Other times, other modes of non-executable files, other umask: the same bytes.
    os.utime(second / "plugin.py", (1_000_000, 1_000_000))
    os.chmod(second / "lib" / "words.txt", 0o600)
    old = os.umask(0o077)
    try:
        two = package.build(second, tmp_path / "out2", signer)
    finally:
        os.umask(old)
    assert one.name == two.name == "greeter-1.2.0.tpkg"
    assert one.read_bytes() == two.read_bytes()
    (second / "plugin.py").write_text("print('changed')\n")
    assert package.build(second, tmp_path / "out3", signer).read_bytes() != one.read_bytes()


def test_verify_and_unpack(tmp_path: Path, built: Path, trust: TrustStore, signer: Signer) -> None:
    verified = package.verify(built, trust, allow_unsigned=False)
    assert verified.signed and verified.trusted
    assert (verified.publisher, verified.publisher_name) == (signer.id, "acme")
    assert verified.manifest.name == "greeter" and verified.version == "1.2.0"
    assert verified.sha256 == hashlib.sha256(built.read_bytes()).hexdigest()
    assert [f.path for f in verified.files] == ["lib/words.txt", "plugin.py", "plugin.toml", "run.sh"]
    with tarfile.open(built) as tar:
        statement = json.loads(tar.extractfile(package.STATEMENT).read())  # type: ignore[union-attr]
    assert schemas.validator("package-statement").errors(statement) == []
    for bad in ("../x", "/etc/x", "a//b", "./a", "a\\b", "a/./b", "a/.."):
        wrong = {**statement, "files": [{**statement["files"][0], "path": bad}]}
        assert schemas.validator("package-statement").errors(wrong), bad
        assert package.path_problem(bad), bad
    dest = package.unpack(verified, tmp_path / "installed")
    assert (dest / "lib" / "words.txt").read_text() == "hello\nworld\n"
    assert os.stat(dest / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(dest / "plugin.py").st_mode & 0o777 == 0o644
    assert not (dest / "__pycache__").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(PackageRefused, match="exists already"):
        package.unpack(verified, dest)


def test_swapped_after_verification(tmp_path: Path, built: Path, trust: TrustStore) -> None:
    verified = package.verify(built, trust, allow_unsigned=False)
    folder = make_plugin(tmp_path / "evil")
    (folder / "plugin.py").write_text("import os; os.system('id')\n")
    shutil.copy(package.build(folder, tmp_path / "evil-out", None), built)
    with pytest.raises(PackageRefused, match="changed since it was verified"):
        package.unpack(verified, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unsigned_is_refused_unless_allowed(tmp_path: Path, trust: TrustStore) -> None:
    file = package.build(make_plugin(tmp_path / "src"), tmp_path / "out", None)
    assert "unsigned" in refused(file, trust)
    verified = package.verify(file, trust, allow_unsigned=True)
    assert not verified.signed and verified.publisher is None


def test_build_refuses_a_symlink_in_the_folder(tmp_path: Path, signer: Signer) -> None:
    folder = make_plugin(tmp_path / "src")
    (folder / "secrets").symlink_to("/etc")
    with pytest.raises(Exception, match="symlink"):
        package.build(folder, tmp_path / "out", signer)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_keys_live_in_files(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "signing")
    made = ring.new("acme")
    assert os.stat(ring.path("acme")).st_mode & 0o777 == 0o600
    assert os.stat(ring.folder).st_mode & 0o777 == 0o700
    assert ring.get().id == made.id and ring.get("acme").sign(b"x") == made.sign(b"x")
    key = PublicKey.parse(made.public.text)
    assert key == made.public
    store = TrustStore(tmp_path / "trusted")
    assert store.trust(key) and not store.trust(key)
    assert store.get(key.id) == key
    # A trust file renamed to another key's id vouches for nothing.
    other = Signer.generate("other")
    shutil.copy(tmp_path / "trusted" / f"{key.id}.pub", tmp_path / "trusted" / f"{other.id}.pub")
    assert store.get(other.id) is None
    assert store.untrust("acme") == key
    # A trust store anyone may write to trusts anyone: refused, never read.
    store.trust(key)
    os.chmod(store.folder, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        store.get(key.id)
    os.chmod(store.folder, 0o755)
    os.chmod(store.folder / f"{key.id}.pub", 0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        store.all()


# --- hostile packages ----------------------------------------------------------------------------------


def test_tampered_file(tmp_path: Path, built: Path, trust: TrustStore) -> None:
    # Re-pack the same entries with one file's bytes changed (same length), statement and signature kept.
    with tarfile.open(built) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    members = [(m, d.replace(b"hello')", b"pwned')") if m.name == "plugin/plugin.py" else d) for m, d in members]
    file = forge(tmp_path / "tampered.tpkg", members)
    assert "tampered: 'plugin.py' does not match its SHA-256" in refused(file, trust)


def test_bad_signature(tmp_path: Path, built: Path, trust: TrustStore, signer: Signer) -> None:
    # The statement edited (another file hash) after signing: the signature no longer verifies.
    with tarfile.open(built) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    stmt = json.loads(members[0][1])
    stmt["files"][1]["size"] += 0
    stmt["files"][1]["sha256"] = "0" * 64
    data = canonical(stmt)
    members[0][0].size = len(data)
    members[0] = (members[0][0], data)
    file = forge(tmp_path / "badsig.tpkg", members)
    assert "bad signature" in refused(file, trust)
    assert "bad signature" in refused(file, trust, allow_unsigned=True)


def test_untrusted_key(tmp_path: Path, trust: TrustStore) -> None:
    mallory = Signer.generate("acme")  # claims the trusted publisher's name
    file = package.build(make_plugin(tmp_path / "src"), tmp_path / "out", mallory)
    reason = refused(file, trust)
    assert f"signed by key {mallory.id} (claims to be 'acme'), which this host does not trust" in reason


def test_traversal_entry(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    files = {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"}
    # In the archive only: the entry is not the next file of the signed list.
    members = signed_members(signer, files)
    members.insert(2, entry("../../etc/cron.d/x", b"* * * * * root sh -c 'id > /tmp/owned'\n"))
    assert "path traversal '../../etc/cron.d/x'" in refused(forge(tmp_path / "trav1.tpkg", members), trust)
    # Signed into the file list by a trusted publisher: refused all the same.
    files["../../etc/cron.d/x"] = b"* * * * * root id\n"
    members = signed_members(signer, files)
    assert "the file list names path traversal" in refused(forge(tmp_path / "trav2.tpkg", members), trust)
    members = signed_members(signer, {**files, "lib/../../../x": b"x"})
    assert "path traversal" in refused(forge(tmp_path / "trav3.tpkg", members), trust)


def test_absolute_path(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    members = signed_members(signer, {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"})
    members.append(entry("/etc/cron.d/x", b"boom"))
    assert "absolute path '/etc/cron.d/x'" in refused(forge(tmp_path / "abs.tpkg", members), trust)
    members = signed_members(signer, {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x", "/etc/passwd": b"x"})
    assert "absolute path" in refused(forge(tmp_path / "abs2.tpkg", members), trust)


def test_escaping_symlink(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    members = signed_members(signer, {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"})
    link = entry("plugin/lib", type=tarfile.SYMTYPE, linkname="../../../../etc")
    members[2:2] = [link, entry("plugin/lib/cron.d/x", b"boom")]
    reason = refused(forge(tmp_path / "link.tpkg", members), trust)
    assert "symlink entry 'plugin/lib' -> '../../../../etc'" in reason
    members = signed_members(signer, {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"})
    members.insert(2, entry("plugin/hard", type=tarfile.LNKTYPE, linkname="/etc/shadow"))
    assert "hard link entry" in refused(forge(tmp_path / "hard.tpkg", members), trust)
    members = signed_members(signer, {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"})
    members.insert(2, entry("plugin/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3))
    assert "device entry" in refused(forge(tmp_path / "dev.tpkg", members), trust)


def test_ten_thousand_files(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    files = {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x", **{f"f/{i:05}": b"" for i in range(10_000)}}
    members = signed_members(signer, files)
    many = forge(tmp_path / "many.tpkg", members)
    assert "its file list (tuxpilot-package.json, at most 2000 files) is 1230347 bytes, more than 1048576" in \
        refused(many, trust)
    reason = refused(many, trust, max_statement_bytes=4 << 20)
    assert "10002 files, more than a package may hold (2000)" in reason
    # The same entries behind a short (valid, signed) file list: stopped at the first one it does not name.
    short = signed_members(signer, {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"})
    members = [*short, *members[2:]]
    assert "is not" in refused(forge(tmp_path / "many2.tpkg", members), trust)


def gzip_bomb(tar_head: bytes, zeros_mib: int, tail: bytes = b"") -> bytes:
    """A gzip stream of `tar_head` then `zeros_mib` MiB of zeros: one compressed MiB repeated (gzip
    members concatenate), ~1 KiB per MiB."""
    mib = gzip.compress(b"\0" * (1 << 20), compresslevel=9, mtime=0)
    return gzip.compress(tar_head, mtime=0) + mib * zeros_mib + gzip.compress(tail, mtime=0)


def test_zip_bomb(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    # A 300 MiB file of zeros in a package of ~300 KiB, honestly listed and signed: over the unpacked cap.
    size = 300 << 20
    zeros_hash = hashlib.sha256()
    for _ in range(300):
        zeros_hash.update(b"\0" * (1 << 20))
    files = {"plugin.toml": MANIFEST.encode(), "plugin.py": b"x"}
    stmt = json.loads(statement(files))
    stmt["files"].insert(0, {"path": "a-zeros", "size": size, "sha256": zeros_hash.hexdigest(), "executable": False})
    data = canonical(stmt)
    zeros = tarfile.TarInfo("plugin/a-zeros")
    zeros.size = size
    head = raw_tar([entry(package.STATEMENT, data), entry(package.SIGNATURE, signature(signer, data))])
    bomb = tmp_path / "bomb.tpkg"
    bomb.write_bytes(gzip_bomb(head + zeros.tobuf(tarfile.USTAR_FORMAT), 300))
    assert bomb.stat().st_size < 1 << 20
    assert "unpacks to 314573086 bytes, more than the cap (268435456)" in refused(bomb, trust)
    # Listed small, stored huge, or hidden in a header: the decompressed stream itself is capped.
    pax = tarfile.TarInfo("plugin/x")
    pax.pax_headers = {"comment": "A" * (4 << 20)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(pax, io.BytesIO(b""))
    (tmp_path / "pax.tpkg").write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    reason = refused(tmp_path / "pax.tpkg", trust, max_unpacked_bytes=1 << 20, max_statement_bytes=1024)
    assert "a decompression bomb" in reason


def raw_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """Tar entries without the end-of-archive blocks, so that what follows is read as more archive."""
    out = b""
    for info, data in members:
        out += info.tobuf(tarfile.USTAR_FORMAT) + (data or b"") + b"\0" * (-len(data or b"") % 512)
    return out


def test_future_api_version(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    future = MANIFEST.replace('api_version = "1"', 'api_version = "7"') + 'new_field = "from the future"\n'
    file = package.build(make_plugin(tmp_path / "src", MANIFEST), tmp_path / "out", signer)
    assert package.verify(file, trust, allow_unsigned=False)
    members = signed_members(signer, {"plugin.toml": future.encode(), "plugin.py": b"x"})
    reason = refused(forge(tmp_path / "future.tpkg", members), trust)
    assert "needs plugin API version 7; this TuxPilot speaks 1" in reason


def test_unmet_dependencies(tmp_path: Path) -> None:
    doc = {"name": "needy", "version": "1.0.0", "description": "d", "category": "custom", "runtime": "javascript",
           "entry_point": "p.js", "api_version": "1", "dependencies": [
               {"name": "sh"}, {"name": "no-such-command-here", "kind": "system"},
               {"name": "python3", "version": ">=3.8,<99"}, {"name": "python3", "version": ">=99"},
               {"name": "greeter", "kind": "plugin", "version": "^1.0"},
               {"name": "absent", "kind": "plugin"}, {"name": "pydantic", "kind": "python", "version": ">=2"},
               {"name": "tuxpilot", "version": ">=999"}]}
    manifest = Manifest.from_doc(doc)
    installed = {"greeter": Manifest.from_doc({**doc, "name": "greeter", "version": "2.1.0", "dependencies": []})}
    problems = deps.check(manifest, installed=installed, runtimes={"javascript": "node is not on PATH"})
    assert problems[0] == "runtime javascript cannot run here: node is not on PATH"
    assert [p.split(",")[0] for p in problems[1:]] == [
        "needs command no-such-command-here",
        "needs command python3 >=99",
        "needs plugin greeter ^1.0",
        "needs plugin absent",
        "needs TuxPilot >=999",
    ]
    assert deps.check(Manifest.from_doc({**doc, "dependencies": [{"name": "sh"}]}), installed={},
                      runtimes={"javascript": None}) == []


def test_unmet_dependency_refuses_the_package(tmp_path: Path, trust: TrustStore, signer: Signer) -> None:
    needy = MANIFEST.replace('[{ name = "sh" }]', '[{ name = "sh" }, { name = "frobnicate", version = ">=2" }]')
    file = package.build(make_plugin(tmp_path / "src", needy), tmp_path / "out", signer)
    verified = package.verify(file, trust, allow_unsigned=False)
    with pytest.raises(PackageRefused) as caught:
        deps.require(verified.manifest, installed={}, runtimes={"python": None})
    assert caught.value.message == "greeter 1.2.0: needs command frobnicate >=2, not found on " + deps.SAFE_PATH


@pytest.mark.parametrize(("version", "spec", "ok"), [
    ("1.2.3", ">=1.2, <2", True), ("2.0.0", ">=1.2 <2", False), ("1.4.9", "==1.4", True), ("1.5.0", "1.4", False),
    ("1.9.0", "^1.2.3", True), ("2.0.0", "^1.2.3", False), ("0.4.0", "^0.3", False), ("1.2.9", "~1.2.3", True),
    ("1.3.0", "~1.2.3", False), ("1.0.0-rc.1", "<1.0.0", True), ("1.10.0", ">1.9", True), ("3.0", "*", True),
])
def test_version_ranges(version: str, spec: str, ok: bool) -> None:
    assert deps.satisfies(version, spec) is ok


def test_refusals_are_one_line_for_garbage(tmp_path: Path, trust: TrustStore) -> None:
    (tmp_path / "junk.tpkg").write_bytes(b"PK\x03\x04 not ours")
    assert "not gzip-compressed" in refused(tmp_path / "junk.tpkg", trust)
    (tmp_path / "cut.tpkg").write_bytes(gzip.compress(b"x" * 1000)[:-20])
    assert "broken archive" in refused(tmp_path / "cut.tpkg", trust)
    (tmp_path / "zl.tpkg").write_bytes(b"\x1f\x8b" + zlib.compress(b"x" * 100))
    refused(tmp_path / "zl.tpkg", trust)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(
    st.lists(st.text("abcXY_-.0", min_size=1, max_size=6).filter(lambda p: p not in (".", "..")),
             min_size=1, max_size=3).map("/".join),
    st.tuples(st.binary(max_size=300), st.booleans()), max_size=6))
def test_any_plugin_round_trips_and_builds_the_same_bytes(tmp_path_factory: pytest.TempPathFactory,
                                                          tree: dict[str, tuple[bytes, bool]]) -> None:
    """Whatever the files, names and modes: verify and unpack give back exactly the files, and a second build
    of the same folder (elsewhere, later) gives the same bytes."""
    # A path may not be both a file and another's folder, nor a name the build leaves out.
    paths = sorted(p for p in tree if not package._ignored(PurePosixPath(p), list(package.IGNORED)))
    folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    files = {p: tree[p] for p in paths if p not in folders and p not in ("plugin.toml", "plugin.py")}
    tmp = tmp_path_factory.mktemp("tree")
    signer = Signer.generate("acme")
    trust = TrustStore(tmp / "trusted")
    trust.trust(signer.public)
    for copy in ("one", "two"):
        folder = tmp / copy
        folder.mkdir()
        (folder / "plugin.toml").write_text(MANIFEST)
        (folder / "plugin.py").write_text("print('x')\n")
        for path, (data, executable) in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
            os.chmod(folder / path, 0o755 if executable else 0o640)
    one = package.build(tmp / "one", tmp / "out1", signer)
    two = package.build(tmp / "two", tmp / "out2", signer)
    assert one.read_bytes() == two.read_bytes()
    dest = package.unpack(package.verify(one, trust, allow_unsigned=False), tmp / "dest")
    for path, (data, executable) in files.items():
        assert (dest / path).read_bytes() == data
        assert os.stat(dest / path).st_mode & 0o777 == (0o755 if executable else 0o644)
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert got == {*files, "plugin.toml", "plugin.py"}
