"""Registries of plugin packages: an object store bucket on the fleet's own bus with a KV index beside it,
or a folder (for air-gapped hosts). Both hold the same documents: the package file and one index entry
per published version (docs/protocol.md, "Package registries").

A registry is not trusted: it stores and finds packages, and `fetch` checks the file it hands over
against the index entry's size and SHA-256; whether a package is installed is decided by verifying it
against the installing host's trust store (`package.verify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from tuxpilot.pdk import package
from tuxpilot.pdk.deps import version_key
from tuxpilot.pdk.settings import MarketHost, RegistryConfig, registry_config
from tuxpilot.protocol import names
from tuxpilot.protocol.errors import Conflict, NotFound, TuxPilotError
from tuxpilot.protocol.manifest import DANGEROUS

log = structlog.get_logger("tuxpilot.packages")


@dataclass(frozen=True)
class Entry:
    """One published version of a plugin: what search and info show without opening the package."""

    name: str
    version: str
    description: str
    category: str
    runtime: str
    api_version: str
    sha256: str
    size: int
    publisher: str | None  # the signing key's id; None: unsigned
    publisher_name: str | None  # the name the package's signature claims (unverified until installed)
    permissions: list[str] = field(default_factory=list)
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    published: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def dangerous(self) -> list[str]:
        return [p for p in self.permissions if p in DANGEROUS]

    def matches(self, query: str) -> bool:
        """Every word of `query` is in the name, the description or the category (case-insensitive)."""
        text = f"{self.name} {self.description} {self.category}".lower()
        return all(word in text for word in query.lower().split())

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Entry:
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        return cls(**known)

    @classmethod
    def of(cls, verified: package.VerifiedPackage) -> Entry:
        m = verified.manifest
        return cls(name=m.name, version=m.version, description=m.description, category=m.category,
                   runtime=m.runtime, api_version=m.api_version, sha256=verified.sha256, size=verified.size,
                   publisher=verified.publisher, publisher_name=verified.publisher_name,
                   permissions=[p.value for p in m.permissions],
                   dependencies=[d.model_dump(exclude_none=True) for d in m.dependencies],
                   published=datetime.now(UTC).isoformat(timespec="seconds"))


def newest(entries: list[Entry]) -> list[Entry]:
    """The newest version of each name, sorted by name."""
    best: dict[str, Entry] = {}
    for e in entries:
        if e.name not in best or version_key(e.version) > version_key(best[e.name].version):
            best[e.name] = e
    return [best[n] for n in sorted(best)]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`NAME[@VERSION]`."""
    name, _, version = ref.partition("@")
    return name, version or None


class Registry:
    """What every registry does. Use as `async with open_registry(config, name) as registry:`."""

    name: str
    where: str

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        return None

    async def entries(self, name: str | None = None) -> list[Entry]:
        """Every published version (of `name`), oldest version first."""
        raise NotImplementedError

    async def _store(self, file: Path, entry: Entry) -> None:
        raise NotImplementedError

    async def _download(self, entry: Entry, target: Path) -> None:
        raise NotImplementedError

    async def publish(self, file: Path) -> Entry:
        """Check the package (integrity, a signature that verifies, a loadable manifest) and store it with
        its index entry. Publishing a version again is refused unless it is the same file."""
        verified = await asyncio.to_thread(package.inspect, file)
        entry = Entry.of(verified)
        for known in await self.entries(entry.name):
            if known.version == entry.version:
                if known.sha256 == entry.sha256:
                    return known
                raise Conflict(f"{entry.ref} is published in {self.name} already, with other contents "
                               f"(sha256 {known.sha256[:16]}…): publish a new version")
        await self._store(file, entry)
        log.debug("package.published", registry=self.name, name=entry.name, version=entry.version,
                 publisher=entry.publisher, sha256=entry.sha256)
        return entry

    async def search(self, query: str) -> list[Entry]:
        """The newest version of each plugin whose name, description or category has every word of `query`."""
        return [e for e in newest(await self.entries()) if e.matches(query)]

    async def info(self, name: str, version: str | None = None) -> Entry:
        """One version of `name`: the newest when `version` is None."""
        found = await self.entries(name)
        if not found:
            raise NotFound(f"no plugin {name!r} in registry {self.name}")
        if version is None:
            return found[-1]
        for e in found:
            if e.version == version:
                return e
        raise NotFound(f"no version {version} of {name} in registry {self.name} "
                       f"(it has {', '.join(e.version for e in found)})")

    async def fetch(self, name: str, version: str | None, dest_dir: Path) -> Path:
        """Download `name` (newest, or `version`) into `dest_dir`; the file is checked against the index
        entry's size and SHA-256 before it is named `<name>-<version>.tpkg` there."""
        entry = await self.info(name, version)
        if entry.size > package.DEFAULT_LIMITS.max_archive_bytes:
            raise package.PackageRefused(f"{entry.ref}: {entry.size} bytes, larger than a package may be")
        tmp = await asyncio.to_thread(_scratch, dest_dir)
        try:
            await self._download(entry, tmp)
            return await asyncio.to_thread(_settle, tmp, entry, dest_dir, self.name)
        finally:
            await asyncio.to_thread(tmp.unlink, True)


def _scratch(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest_dir, prefix=".fetch-")
    os.close(fd)
    return Path(name)


def _settle(tmp: Path, entry: Entry, dest_dir: Path, registry: str) -> Path:
    """Name the downloaded file once it is the one the index entry describes."""
    if _sha256(tmp) != entry.sha256 or tmp.stat().st_size != entry.size:
        raise package.PackageRefused(f"{entry.ref} from registry {registry} does not match its index entry "
                                     "(sha256 or size): refused")
    target = dest_dir / package.file_name(entry.name, entry.version)
    tmp.replace(target)
    return target


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            digest.update(chunk)
    return digest.hexdigest()


def _sorted(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.name, version_key(e.version)))


class FolderRegistry(Registry):
    """`<path>/<name>/<name>-<version>.tpkg` and its entry `<name>-<version>.json` beside it: a folder that
    can be copied to a USB stick or served read-only."""

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path, self.where = name, path, str(path)

    async def entries(self, name: str | None = None) -> list[Entry]:
        return await asyncio.to_thread(self._entries_now, name)

    def _entries_now(self, name: str | None) -> list[Entry]:
        if not self.path.is_dir():
            return []
        pattern = f"{name}/{name}-*.json" if name else "*/*.json"
        found: list[Entry] = []
        for doc_path in self.path.glob(pattern):
            try:
                entry = Entry.from_doc(json.loads(doc_path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("registry.bad_entry", registry=self.name, file=str(doc_path), error=str(exc))
                continue
            if name is None or entry.name == name:
                found.append(entry)
        return _sorted(found)

    def _file(self, entry: Entry, suffix: str) -> Path:
        return self.path / entry.name / f"{entry.name}-{entry.version}{suffix}"

    async def _store(self, file: Path, entry: Entry) -> None:
        await asyncio.to_thread(self._store_now, file, entry)

    def _store_now(self, file: Path, entry: Entry) -> None:
        (self.path / entry.name).mkdir(parents=True, exist_ok=True)
        # The package first, then its entry: an entry never names a package that is not there yet.
        target = self._file(entry, package.SUFFIX)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(file, tmp)
        os.chmod(tmp, 0o644)
        tmp.replace(target)
        target = self._file(entry, ".json")
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(entry.to_doc(), indent=2) + "\n")
        os.chmod(tmp, 0o644)
        tmp.replace(target)

    async def _download(self, entry: Entry, target: Path) -> None:
        source = self._file(entry, package.SUFFIX)
        try:
            await asyncio.to_thread(shutil.copyfile, source, target)
        except FileNotFoundError:
            raise NotFound(f"{entry.ref}: its package file is missing from {self.path}") from None


class BusRegistry(Registry):
    """An object store bucket on the host's bus holding the packages, and a KV bucket indexing them."""

    def __init__(self, name: str, config: MarketHost, settings: RegistryConfig, nc: Any | None) -> None:
        subjects = names.Subjects.of(config)
        self.name = name
        self.bucket = settings.bucket or names.packages_bucket(subjects)
        self.index = names.package_index_bucket(self.bucket)
        self.where = f"bucket {self.bucket} on the host's bus"
        self._config, self._settings, self._nc, self._own = config, settings, nc, nc is None

    async def _client(self) -> Any:
        if self._nc is None:
            from tuxpilot.bus import connect as bus

            url = bus.local_url(self._config)  # type: ignore[arg-type]
            if url is None:
                raise TuxPilotError("no NATS server for the fleet registry: set nats.url or start `tuxpilot up`",
                                    code="unavailable")
            self._nc = await bus.connect(bus.local_nats(self._config), url,  # type: ignore[arg-type]
                                         name="tuxpilot-registry",
                                         give_up_after_s=self._config.nats.connect_timeout_s)
        return self._nc

    async def close(self) -> None:
        if self._own and self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _kv(self, create: bool = False) -> Any:
        from nats.js.errors import BucketNotFoundError

        js = (await self._client()).jetstream()
        try:
            return await js.key_value(self.index)
        except BucketNotFoundError:
            if not create:
                return None
        from tuxpilot.bus.streams import replicas_for

        return await js.create_key_value(bucket=self.index, history=1,
                                         replicas=replicas_for(await self._client(), self._config.streams),
                                         description="TuxPilot package index: one entry per published version")

    async def _objects(self, create: bool = False) -> Any:
        from nats.js.api import ObjectStoreConfig
        from nats.js.errors import BucketNotFoundError

        js = (await self._client()).jetstream()
        try:
            return await js.object_store(self.bucket)
        except BucketNotFoundError:
            if not create:
                raise NotFound(f"registry {self.name} ({self.where}) holds no packages yet") from None
        from tuxpilot.bus.streams import replicas_for

        config = ObjectStoreConfig(description="TuxPilot plugin packages", max_bytes=self._settings.max_bytes,
                                   replicas=replicas_for(await self._client(), self._config.streams))
        return await js.create_object_store(self.bucket, config=config)

    async def entries(self, name: str | None = None) -> list[Entry]:
        kv = await self._kv()
        if kv is None:
            return []
        watcher = await kv.watch(f"{name}.>" if name else ">", ignore_deletes=True)
        found: list[Entry] = []
        try:
            while True:
                update = await watcher.updates(timeout=self._config.nats.request_timeout_s)
                if update is None:  # every current entry delivered
                    break
                if update.value:
                    with contextlib.suppress(ValueError, TypeError):
                        found.append(Entry.from_doc(json.loads(update.value)))
        finally:
            await watcher.stop()
        return _sorted([e for e in found if name is None or e.name == name])

    async def _store(self, file: Path, entry: Entry) -> None:
        from nats.js.api import ObjectMeta

        objects = await self._objects(create=True)
        kv = await self._kv(create=True)
        with open(file, "rb") as f:  # noqa: ASYNC230 - read in the client's executor
            await objects.put(names.package_object(entry.name, entry.version), f,
                              meta=ObjectMeta(description=entry.ref))
        # The object first, then its entry: an entry never names a package that is not stored yet.
        await kv.put(names.package_key(entry.name, entry.version), json.dumps(entry.to_doc()).encode())

    async def _download(self, entry: Entry, target: Path) -> None:
        from nats.js.errors import NotFoundError

        objects = await self._objects()
        name = names.package_object(entry.name, entry.version)
        try:
            info = await objects.get_info(name)
        except NotFoundError:
            raise NotFound(f"{entry.ref}: its package is missing from {self.where}") from None
        if info.size != entry.size:
            raise package.PackageRefused(f"{entry.ref}: the stored package is {info.size} bytes, its index entry "
                                         f"says {entry.size}")
        with open(target, "wb") as f:  # noqa: ASYNC230 - written in the client's executor
            await objects.get(name, writeinto=f)


def open_registry(config: MarketHost, name: str | None = None, *, nc: Any | None = None) -> Registry:
    """The registry named `name` in the host config (None: the default, `marketplace.registry`).

    A bus registry uses `nc` when given (the agent's connection, say), else connects as this host's
    operator when first used and closes that connection on exit.
    """
    chosen, settings = registry_config(config, name)
    if settings.path is not None:
        return FolderRegistry(chosen, settings.path)
    return BusRegistry(chosen, config, settings, nc)
