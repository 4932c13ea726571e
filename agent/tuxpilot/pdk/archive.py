"""The package format, as data: its entry names, caps, the statement's file entries, a verified package,
and the rules every path in a package obeys (docs/protocol.md, "Plugin packages")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tuxpilot.pdk.keys import PublicKey
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import Manifest

FORMAT = "tuxpilot-package"
FORMAT_VERSION = 1
SUFFIX = ".tpkg"
STATEMENT = "tuxpilot-package.json"
SIGNATURE = "tuxpilot-package.sig"
PAYLOAD = "plugin/"
CHUNK = 64 * 1024
# A packaged container plugin's image is named for the plugin and its version (docs/protocol.md).
IMAGE_REPOSITORY = "tuxpilot-plugin-"
IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


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


def normal(path: str) -> str:
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


def package_image(name: str, version: str) -> str:
    """The one image reference a packaged container plugin may name."""
    return f"{IMAGE_REPOSITORY}{name}:{version}"


def image_problem(manifest: Manifest) -> str | None:
    """Why a package may not carry this container plugin, or None. The host makes the image from what the
    package carries (its tarball or Dockerfile), never from what the engine already holds under a name (a tag
    can be re-pointed by whoever loads images); and the name is the plugin's own, so that installing one
    replaces no image anything else on the host runs."""
    if manifest.runtime != "container":
        return None
    if not IMAGE_TAG.match(manifest.version):
        return f"version {manifest.version!r} cannot be an image tag (a container plugin's version is its image's tag)"
    want = package_image(manifest.name, manifest.version)
    if manifest.image != want:
        return (f"a packaged container plugin's image is {want} (made from the package's own {manifest.entry_point}), "
                f"not {manifest.image}")
    return None
