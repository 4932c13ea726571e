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
import contextlib
import fnmatch
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO

from tuxpilot.pdk.archive import (
    CHUNK,
    DEFAULT_LIMITS,
    FORMAT,
    FORMAT_VERSION,
    PAYLOAD,
    SIGNATURE,
    STATEMENT,
    SUFFIX,
    Limits,
    PackageFile,
    PackageRefused,
    VerifiedPackage,
    canonical,
    file_name,
    image_problem,
    normal,
    path_problem,
)
from tuxpilot.pdk.keys import ALGORITHM, Signer, TrustStore
from tuxpilot.pdk.reader import scan
from tuxpilot.protocol.errors import ConfigError

__all__ = [
    "DEFAULT_LIMITS",
    "SIGNATURE",
    "STATEMENT",
    "SUFFIX",
    "Limits",
    "PackageFile",
    "PackageRefused",
    "VerifiedPackage",
    "build",
    "canonical",
    "collect",
    "file_name",
    "inspect",
    "path_problem",
    "unpack",
    "verify",
]

# Never packaged: build output, caches, VCS data and installed dependencies (a JS plugin's are installed
# by the host from its lockfile). A `.tuxpilotignore` in the folder adds glob patterns, one a line.
IGNORED = ("__pycache__", "*.pyc", ".git", ".hg", ".svn", "node_modules", ".venv", "venv", "target",
           ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", f"*{SUFFIX}", ".DS_Store",
           ".tuxpilotignore")
IGNORE_FILE = ".tuxpilotignore"


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
    if manifest.entry_point not in {f.path for f, _ in files} and normal(manifest.entry_point) not in {
        f.path for f, _ in files
    }:
        raise ConfigError(f"{folder}: entry_point {manifest.entry_point!r} is not among the files packaged "
                          "(built yet? ignored?)")
    problem = image_problem(manifest)
    if problem is not None:
        raise ConfigError(f"{folder}: {problem}")
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


def inspect(file: Path, *, limits: Limits = DEFAULT_LIMITS) -> VerifiedPackage:
    """Check a package's integrity, and its signature if it has one, without deciding whether its publisher
    is trusted (what a registry does on publish; `trusted` is False)."""
    return scan(file, limits, trust=None, allow_unsigned=True)


def verify(file: Path, trust: TrustStore, *, allow_unsigned: bool, limits: Limits = DEFAULT_LIMITS) -> VerifiedPackage:
    """Check integrity and signature against `trust`. Raises PackageRefused (one-line reason) for a
    tampered file, a bad signature, an untrusted key or no signature (unless `allow_unsigned`), an unsafe
    entry, a broken cap, or a manifest this TuxPilot cannot load (a future api_version)."""
    return scan(file, limits, trust=trust, allow_unsigned=allow_unsigned)


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
        again = scan(package.path, limits, trust=None, allow_unsigned=True, sink=sink)
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
