"""A plugin package (`<name>-<version>.tpkg`): building it reproducibly, verifying it against a trust
store, and unpacking it safely. The format is in docs/protocol.md ("Plugin packages").

A package is a gzip-compressed ustar archive whose first entry is the statement
(`tuxpilot-package.json`: name, version and every file's path, size, SHA-256 and executable bit), then
the publisher's Ed25519 signature over the statement's exact bytes (`tuxpilot-package.sig`, absent when
unsigned), then the plugin's files under `plugin/`, in the statement's order. Nothing else may be in
it: no directories, links or devices, no path that is absolute or climbs with `..`, no entry twice.

Verification streams the archive once, under caps on its size, its unpacked size and its entry count
that hold before any data is read (a decompression bomb stops at the cap, not in memory), and refuses
anything off with one line (`PackageRefused`). Unpacking reads the archive again, checks every byte
against the verified statement again (the file may have changed since), and writes only into a fresh
temporary folder beside `dest`, renamed into place once complete.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import tomllib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tuxpilot.pdk.keys import ALGORITHM, PublicKey, Signer, TrustStore
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.protocol.manifest import API_VERSIONS, MANIFEST_FILE, Manifest

FORMAT = "tuxpilot-package"
FORMAT_VERSION = 1
SUFFIX = ".tpkg"
STATEMENT = "tuxpilot-package.json"
SIGNATURE = "tuxpilot-package.sig"
PAYLOAD = "plugin/"
# Never packaged: build output, caches, VCS data and installed dependencies (a JS plugin's are installed
# by the host from its lockfile). A `.tuxpilotignore` in the folder adds glob patterns, one a line.
IGNORED = ("__pycache__", "*.pyc", ".git", ".hg", ".svn", "node_modules", ".venv", "venv", "target",
           ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", f"*{SUFFIX}", ".DS_Store",
           ".tuxpilotignore")
IGNORE_FILE = ".tuxpilotignore"
CHUNK = 64 * 1024


class PackageRefused(TuxPilotError):
    """A package that is not installed: the message is the one-line reason."""

    code = "package_refused"


@dataclass(frozen=True)
class Limits:
    """Caps checked while reading, before the bytes they count are read."""

    max_archive_bytes: int = 64 * 1024 * 1024
    max_unpacked_bytes: int = 256 * 1024 * 1024
    max_files: int = 2000
    max_path: int = 200
    max_statement_bytes: int = 1024 * 1024
    max_manifest_bytes: int = 256 * 1024


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PackageFile:
    path: str  # relative, POSIX, normalised
    size: int
    sha256: str
    executable: bool = False

    def to_doc(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "executable": self.executable}


@dataclass(frozen=True)
class VerifiedPackage:
    """A package whose every byte matched its statement, and whose signature (if any) verified.

    `signed`: a valid signature is present; `trusted`: by a key in the trust store it was verified against
    (`verify`; always False from `inspect`). `publisher` is the signing key's id, `publisher_name` the trust
    store's name for it, or for an untrusted key the name the package claims.
    """

    path: Path
    sha256: str
    size: int
    manifest: Manifest
    files: tuple[PackageFile, ...]
    signed: bool
    trusted: bool
    publisher: str | None
    publisher_name: str | None
    public_key: PublicKey | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


def file_name(name: str, version: str) -> str:
    return f"{name}-{version}{SUFFIX}"


def canonical(doc: Any) -> bytes:
    """The one JSON encoding signed and hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- building -------------------------------------------------------------------------------------------


def _ignored(rel: PurePosixPath, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(part, p) for part in rel.parts for p in patterns) or any(
        fnmatch.fnmatchcase(str(rel), p) for p in patterns
    )


def collect(folder: Path, limits: Limits = DEFAULT_LIMITS) -> list[tuple[PackageFile, Path]]:
    """The files of the plugin in `folder`, sorted by path (bytewise), with their hashes. A symlink or a
    special file is refused rather than followed: it could pull in a file from elsewhere."""
    patterns = list(IGNORED)
    extra = folder / IGNORE_FILE
    if extra.is_file():
        patterns += [line.strip() for line in extra.read_text().splitlines() if line.strip() and line[0] != "#"]
    found: list[tuple[PackageFile, Path]] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in [*dirs]:
            rel = PurePosixPath((base / name).relative_to(folder).as_posix())
            if _ignored(rel, patterns):
                dirs.remove(name)
            elif (base / name).is_symlink():
                raise ConfigError(f"{base / name}: a symlink; packages hold regular files only")
        for name in names:
            path = base / name
            rel = PurePosixPath(path.relative_to(folder).as_posix())
            if _ignored(rel, patterns):
                continue
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{path}: a symlink or special file; packages hold regular files only")
            problem = path_problem(str(rel), limits)
            if problem:
                raise ConfigError(f"{path}: {problem}")
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    digest.update(chunk)
            found.append((PackageFile(str(rel), st.st_size, digest.hexdigest(), bool(st.st_mode & 0o111)), path))
    found.sort(key=lambda item: item[0].path.encode())
    if len(found) > limits.max_files:
        raise ConfigError(f"{folder}: {len(found)} files, more than a package may hold ({limits.max_files})")
    return found


def _tar_entry(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int, executable: bool) -> None:
    # Everything but the name, size and executable bit is fixed: same input, same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o755 if executable else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    try:
        tar.addfile(info, data)
    except ValueError as exc:  # a name ustar cannot hold
        raise ConfigError(f"{name}: cannot be stored in a package ({exc})") from exc


def build(folder: Path, out_dir: Path, signer: Signer | None, *, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Package the plugin in `folder` into `out_dir/<name>-<version>.tpkg`, signed by `signer` if given.

    Reproducible: the same files and key give the same bytes (entries sorted, times, owners and modes
    fixed, no timestamp or file name in the gzip header; Ed25519 signatures are deterministic).
    """
    from tuxpilot.protocol.manifest import load

    manifest = load(folder)
    files = collect(folder, limits)
    if manifest.entry_point not in {f.path for f, _ in files} and _normal(manifest.entry_point) not in {
        f.path for f, _ in files
    }:
        raise ConfigError(f"{folder}: entry_point {manifest.entry_point!r} is not among the files packaged "
                          "(built yet? ignored?)")
    statement = canonical({
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": manifest.name, "version": manifest.version,
        "files": [f.to_doc() for f, _ in files],
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / file_name(manifest.name, manifest.version)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            _tar_entry(tar, STATEMENT, io.BytesIO(statement), len(statement), False)
            if signer is not None:
                sig = canonical({"algorithm": ALGORITHM, "key_id": signer.id, "publisher": signer.name,
                                 "public_key": _b64(signer.public.key), "signature": _b64(signer.sign(statement))})
                _tar_entry(tar, SIGNATURE, io.BytesIO(sig), len(sig), False)
            for entry, path in files:
                with path.open("rb") as f:
                    _tar_entry(tar, PAYLOAD + entry.path, f, entry.size, entry.executable)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- reading --------------------------------------------------------------------------------------------


def _normal(path: str) -> str:
    return str(PurePosixPath(path))


def path_problem(path: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why `path` may not be a file of a package, or None."""
    if not path:
        return "an empty path"
    if path.startswith("/"):
        return f"absolute path {path!r}"
    parts = path.split("/")
    if ".." in parts:
        return f"path traversal {path!r}"
    if any(p in ("", ".") for p in parts) or "\\" in path:
        return f"path {path!r} is not normalised"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return f"path {path!r} has control characters"
    if len(path.encode()) > limits.max_path:
        return f"path {path[:40]!r}… is longer than {limits.max_path} bytes"
    return None


def refuse(file: Path, reason: str) -> PackageRefused:
    return PackageRefused(f"{file.name}: {reason}")


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
    if _normal(manifest.entry_point) not in paths:
        raise refuse(file, f"entry_point {manifest.entry_point!r} is not in the package")
    return manifest


Sink = Callable[[PackageFile], IO[bytes]]


def _scan(file: Path, limits: Limits, *, trust: TrustStore | None, allow_unsigned: bool,
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


def inspect(file: Path, *, limits: Limits = DEFAULT_LIMITS) -> VerifiedPackage:
    """Check a package's integrity, and its signature if it has one, without deciding whether its publisher
    is trusted (what a registry does on publish; `trusted` is False)."""
    return _scan(file, limits, trust=None, allow_unsigned=True)


def verify(file: Path, trust: TrustStore, *, allow_unsigned: bool, limits: Limits = DEFAULT_LIMITS) -> VerifiedPackage:
    """Check integrity and signature against `trust`. Raises PackageRefused (one-line reason) for a
    tampered file, a bad signature, an untrusted key or no signature (unless `allow_unsigned`), an unsafe
    entry, a broken cap, or a manifest this TuxPilot cannot load (a future api_version)."""
    return _scan(file, limits, trust=trust, allow_unsigned=allow_unsigned)


def unpack(package: VerifiedPackage, dest: Path, *, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Write the verified package's files into `dest`, a folder that must not exist yet.

    Written into a fresh temporary folder beside `dest` (files created exclusively, never through a
    link) and renamed to `dest` once every byte has matched the statement again; on any failure the
    temporary folder is removed and `dest` never appears.
    """
    if dest.exists() or dest.is_symlink():
        raise PackageRefused(f"{dest} exists already")
    parent = dest.parent.resolve(strict=True)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.unpack-"))
    real = work.resolve()

    def sink(entry: PackageFile) -> IO[bytes]:
        target = work / entry.path
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # The folders were all made here, from checked paths; checked once more before writing.
        if not target.parent.resolve().is_relative_to(real):
            raise PackageRefused(f"{entry.path!r} leads outside the package folder")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o755 if entry.executable else 0o644)
        return os.fdopen(fd, "wb")

    try:
        again = _scan(package.path, limits, trust=None, allow_unsigned=True, sink=sink)
        if again.sha256 != package.sha256:
            raise PackageRefused(f"{package.path.name}: changed since it was verified")
        for entry in package.files:  # umask may have taken bits off
            os.chmod(work / entry.path, 0o755 if entry.executable else 0o644)
        os.chmod(work, 0o755)
        os.rename(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest
