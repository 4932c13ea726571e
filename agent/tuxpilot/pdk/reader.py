"""Reading a package: one pass over the archive, every header checked before its bytes are read, every
byte checked against the statement, under the caps (a decompression bomb stops at the cap, not in
memory). Refuses anything off with one line; `sink` receives each file's bytes as they are checked."""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import tarfile
import tomllib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tuxpilot.pdk.archive import (
    CHUNK,
    FORMAT,
    FORMAT_VERSION,
    PAYLOAD,
    SIGNATURE,
    STATEMENT,
    Limits,
    PackageFile,
    PackageRefused,
    VerifiedPackage,
    image_problem,
    normal,
    path_problem,
    refuse,
)
from tuxpilot.pdk.keys import ALGORITHM, PublicKey, TrustStore
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import API_VERSIONS, MANIFEST_FILE, Manifest


class _Capped(io.RawIOBase):
    """The decompressed stream, cut off at a byte count: every tar header, long name or pax record is
    counted too, so no part of the archive can make the reader hold or write more than the cap."""

    def __init__(self, inner: io.BufferedIOBase, cap: int, on_over: Callable[[], PackageRefused]) -> None:
        self.inner, self.left, self.on_over = inner, cap, on_over

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        data = self.inner.read(min(len(view), self.left + 1))
        if len(data) > self.left:
            raise self.on_over()
        self.left -= len(data)
        view[: len(data)] = data
        return len(data)


class _Hashing(io.RawIOBase):
    """The raw file, hashed as it is read: the archive's own SHA-256 without a second read."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner, self.digest = inner, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.digest.update(data)
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        for chunk in iter(lambda: self.inner.read(CHUNK), b""):
            self.digest.update(chunk)


def _member_problem(member: tarfile.TarInfo, limits: Limits) -> str | None:
    kind = ("symlink" if member.issym() else "hard link" if member.islnk() else "directory" if member.isdir()
            else "device" if member.isdev() else None if member.isreg() else "special file")
    if kind:
        target = f" -> {member.linkname!r}" if member.issym() or member.islnk() else ""
        return f"{kind} entry {member.name!r}{target}: packages hold regular files only"
    return path_problem(member.name, limits)


def _statement(data: bytes, file: Path, limits: Limits) -> tuple[str, str, list[PackageFile]]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise refuse(file, f"{STATEMENT} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise refuse(file, f"{STATEMENT} is not a TuxPilot package statement")
    if doc.get("format_version") != FORMAT_VERSION:
        raise refuse(file, f"package format version {doc.get('format_version')!r} is not one this TuxPilot "
                           f"reads ({FORMAT_VERSION})")
    entries = doc.get("files")
    if not isinstance(entries, list) or not isinstance(doc.get("name"), str) or not isinstance(doc.get("version"), str):
        raise refuse(file, f"{STATEMENT} lacks name, version or files")
    if len(entries) > limits.max_files:
        raise refuse(file, f"{len(entries)} files, more than a package may hold ({limits.max_files})")
    files: list[PackageFile] = []
    total = 0
    for item in entries:
        try:
            entry = PackageFile(str(item["path"]), int(item["size"]), str(item["sha256"]), bool(item["executable"]))
        except (KeyError, TypeError, ValueError):
            raise refuse(file, f"{STATEMENT}: a file entry lacks path, size, sha256 or executable") from None
        problem = path_problem(entry.path, limits)
        if problem:
            raise refuse(file, f"the file list names {problem}")
        if entry.size < 0 or len(entry.sha256) != 64:
            raise refuse(file, f"the file list's entry for {entry.path!r} is malformed")
        total += entry.size
        files.append(entry)
    if total > limits.max_unpacked_bytes:
        raise refuse(file, f"unpacks to {total} bytes, more than the cap ({limits.max_unpacked_bytes})")
    paths = [f.path.encode() for f in files]
    if paths != sorted(set(paths)):
        raise refuse(file, "the file list is not sorted or names a file twice")
    # A file may not also be a folder of another (`a` and `a/b`): unpacking could not make both.
    folders = {"/".join(f.path.split("/")[:i]) for f in files for i in range(1, f.path.count("/") + 1)}
    if any(f.path in folders for f in files):
        raise refuse(file, "the file list names a file and a folder of the same path")
    return doc["name"], doc["version"], files


def _signature(data: bytes, statement: bytes, file: Path) -> PublicKey:
    """The key that signed `statement`; refuses a signature that does not verify (tampering)."""
    try:
        doc = json.loads(data)
        key = PublicKey(str(doc.get("publisher") or "unnamed"), base64.b64decode(doc["public_key"], validate=True))
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise refuse(file, f"{SIGNATURE} is malformed") from None
    if doc.get("algorithm") != ALGORITHM or len(key.key) != 32:
        raise refuse(file, f"{SIGNATURE}: not an {ALGORITHM} signature")
    if not key.verifies(statement, signature):
        raise refuse(file, f"bad signature: the file list was not signed by key {key.id} it names")
    return key


def _manifest(data: bytes, file: Path, name: str, version: str, paths: set[str]) -> Manifest:
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise refuse(file, f"{MANIFEST_FILE}: {exc}") from None
    # Said before anything else: a manifest of a newer protocol may not even parse under this one's schema.
    api = str(doc.get("api_version", "1"))
    if api not in API_VERSIONS:
        raise refuse(file, f"needs plugin API version {api}; this TuxPilot speaks {', '.join(sorted(API_VERSIONS))}")
    try:
        manifest = Manifest.from_doc(doc, source=MANIFEST_FILE)
    except ConfigError as exc:
        raise refuse(file, exc.message) from None
    if (manifest.name, manifest.version) != (name, version):
        raise refuse(file, f"the file list is for {name} {version} but the manifest says {manifest.name} "
                           f"{manifest.version}")
    if normal(manifest.entry_point) not in paths:
        raise refuse(file, f"entry_point {manifest.entry_point!r} is not in the package")
    problem = image_problem(manifest)
    if problem is not None:
        raise refuse(file, problem)
    return manifest


Sink = Callable[[PackageFile], IO[bytes]]


def scan(file: Path, limits: Limits, *, trust: TrustStore | None, allow_unsigned: bool,
          sink: Sink | None = None) -> VerifiedPackage:
    """Read the whole archive once, checking as it goes; `sink` gets each verified file's bytes."""
    try:
        size = file.stat().st_size
        raw_file = file.open("rb")
    except OSError as exc:
        raise PackageRefused(f"{file}: {exc.strerror or exc}") from None
    if size > limits.max_archive_bytes:
        raw_file.close()
        raise refuse(file, f"{size} bytes, larger than a package may be ({limits.max_archive_bytes})")
    with raw_file:
        raw = _Hashing(raw_file)
        buffered = io.BufferedReader(raw)
        if buffered.peek(2)[:2] != b"\x1f\x8b":
            raise refuse(file, "not a package (not gzip-compressed)")
        overhead = (limits.max_files + 2) * 3 * 512 + limits.max_statement_bytes + 64 * 1024
        cap = limits.max_unpacked_bytes + overhead
        try:
            with gzip.GzipFile(fileobj=buffered, mode="rb") as gz:
                capped = io.BufferedReader(_Capped(
                    gz, cap, lambda: refuse(file, f"unpacks to more than {cap} bytes (a decompression bomb?)")))
                with tarfile.open(fileobj=capped, mode="r|", format=tarfile.USTAR_FORMAT) as tar:
                    result = _entries(file, tar, limits, trust=trust, allow_unsigned=allow_unsigned, sink=sink)
            raw.drain()
        except PackageRefused:
            raise
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise refuse(file, f"a broken archive ({type(exc).__name__}: {exc})") from None
    return VerifiedPackage(path=file, sha256=raw.digest.hexdigest(), size=size, **result)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int, file: Path, what: str) -> bytes:
    if member.size > cap:
        raise refuse(file, f"{what} is {member.size} bytes, more than {cap}")
    f = tar.extractfile(member)
    assert f is not None  # a regular file
    return f.read()


def _entries(file: Path, tar: tarfile.TarFile, limits: Limits, *, trust: TrustStore | None, allow_unsigned: bool,
             sink: Sink | None) -> dict[str, Any]:
    members = _members(file, tar, limits)
    first = next(members, None)
    if first is None or first.name != STATEMENT:
        raise refuse(file, f"the first entry is not {STATEMENT}")
    statement = _read(tar, first, limits.max_statement_bytes, file,
                      f"its file list ({STATEMENT}, at most {limits.max_files} files)")
    name, version, files = _statement(statement, file, limits)
    member = next(members, None)
    key: PublicKey | None = None
    if member is not None and member.name == SIGNATURE:
        key = _signature(_read(tar, member, 64 * 1024, file, SIGNATURE), statement, file)
        member = next(members, None)
    trusted_key = trust.get(key.id) if trust is not None and key is not None else None
    trusted = trusted_key is not None and key is not None and trusted_key.key == key.key
    if trust is not None and not trusted and not allow_unsigned:
        # Refused before a byte of the payload is read.
        if key is None:
            raise refuse(file, "unsigned, and this host accepts only signed packages (marketplace.allow_unsigned)")
        raise refuse(file, f"signed by key {key.id} (claims to be {key.name!r}), which this host does not trust "
                           f"(tuxpilot key trust)")
    manifest_bytes: bytes | None = None
    for expected in files:
        if member is None:
            raise refuse(file, f"{expected.path!r} is in the file list but not in the archive")
        if member.name != PAYLOAD + expected.path:
            raise refuse(file, f"entry {member.name!r} is not the next file of the signed list "
                               f"({PAYLOAD + expected.path!r})")
        if member.size != expected.size:
            raise refuse(file, f"{expected.path!r} is {member.size} bytes, the file list says {expected.size}")
        source = tar.extractfile(member)
        assert source is not None
        digest = hashlib.sha256()
        keep = expected.path == MANIFEST_FILE
        kept = bytearray()
        out = sink(expected) if sink is not None else None
        try:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                if keep and len(kept) <= limits.max_manifest_bytes:
                    kept += chunk
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
        if digest.hexdigest() != expected.sha256:
            raise refuse(file, f"tampered: {expected.path!r} does not match its SHA-256 in the file list")
        if keep:
            if len(kept) > limits.max_manifest_bytes:
                raise refuse(file, f"{MANIFEST_FILE} is larger than {limits.max_manifest_bytes} bytes")
            manifest_bytes = bytes(kept)
        member = next(members, None)
    if member is not None:
        raise refuse(file, f"entry {member.name!r} is not in the signed file list")
    if manifest_bytes is None:
        raise refuse(file, f"no {MANIFEST_FILE} in the package")
    manifest = _manifest(manifest_bytes, file, name, version, {f.path for f in files})
    publisher_name = (trusted_key.name if trusted_key else key.name) if key else None
    return {"manifest": manifest, "files": tuple(files), "signed": key is not None, "trusted": trusted,
            "publisher": key.id if key else None, "publisher_name": publisher_name, "public_key": key}


def _members(file: Path, tar: tarfile.TarFile, limits: Limits) -> Iterator[tarfile.TarInfo]:
    """The archive's entries, each checked on its header alone; counted, and stopped past the cap."""
    seen: set[str] = set()
    for count, member in enumerate(tar, start=1):
        if count > limits.max_files + 2:
            raise refuse(file, f"more than {limits.max_files} files, more than a package may hold")
        problem = _member_problem(member, limits)
        if problem:
            raise refuse(file, problem)
        if member.name in seen:
            raise refuse(file, f"entry {member.name!r} appears twice")
        seen.add(member.name)
        yield member
