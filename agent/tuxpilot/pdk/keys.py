"""Publisher keys: Ed25519 signing keys (the publisher's, private) and the trust store (the public keys a
host accepts packages from). Both are folders of small JSON files.

A key's id is the first 16 hex digits of the SHA-256 of its public key: short enough to read aloud,
and never trusted alone (the trust store keeps the whole public key and verification compares it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from tuxpilot.protocol.errors import ConfigError, NotFound

ALGORITHM = "ed25519"
# The one-line text form of a public key, for sharing it: `ed25519:<base64> <name>`.
PUBLIC_KEY_TEXT = re.compile(r"^ed25519:([A-Za-z0-9+/]{43}=)(?:\s+([a-z0-9_.-]{1,64}))?\s*$")
NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _check_name(name: str) -> str:
    if not NAME.match(name) or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use 1-64 characters of a-z 0-9 _ . - (not starting with a dot)")
    return name


@dataclass(frozen=True)
class PublicKey:
    """A publisher's public key and the name it goes by."""

    name: str
    key: bytes

    @property
    def id(self) -> str:
        return key_id(self.key)

    @property
    def text(self) -> str:
        return f"{ALGORITHM}:{_b64(self.key)} {self.name}"

    def verifies(self, data: bytes, signature: bytes) -> bool:
        try:
            VerifyKey(self.key).verify(data, signature)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True

    @classmethod
    def parse(cls, text: str, name: str | None = None) -> PublicKey:
        """A key in its text form (`ed25519:<base64> [name]`); `name` overrides the one in the text."""
        found = PUBLIC_KEY_TEXT.match(text.strip())
        if not found:
            raise ConfigError("not a public key: expected `ed25519:<base64 of 32 bytes> [name]`")
        raw = base64.b64decode(found.group(1))
        chosen = name or found.group(2)
        if not chosen:
            raise ConfigError("the public key names no publisher: give one with --name")
        return cls(_check_name(chosen), raw)


class Signer:
    """A publisher's private signing key."""

    def __init__(self, name: str, key: SigningKey) -> None:
        self.name = _check_name(name)
        self._key = key
        self.public = PublicKey(self.name, bytes(key.verify_key))

    @property
    def id(self) -> str:
        return self.public.id

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data).signature)

    @classmethod
    def generate(cls, name: str) -> Signer:
        return cls(name, SigningKey.generate())

    def to_doc(self) -> dict[str, str]:
        return {"algorithm": ALGORITHM, "name": self.name, "key_id": self.id,
                "public_key": _b64(self.public.key), "seed": _b64(bytes(self._key))}

    @classmethod
    def from_doc(cls, doc: dict[str, str], *, source: str) -> Signer:
        try:
            return cls(doc["name"], SigningKey(base64.b64decode(doc["seed"], validate=True)))
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: not a signing key ({type(exc).__name__})") from exc


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `mode` from the start (never briefly readable by others); refuse to replace one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class KeyRing:
    """The signing keys of whoever runs `tuxpilot` here: `<folder>/<name>.key` (0600 in a 0700 folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / f"{_check_name(name)}.key"

    def new(self, name: str) -> Signer:
        path = self.path(name)
        if path.exists():
            raise ConfigError(f"a signing key named {name!r} exists already ({path})")
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        signer = Signer.generate(name)
        _write_new(path, json.dumps(signer.to_doc(), indent=2) + "\n", 0o600)
        return signer

    def all(self) -> list[Signer]:
        if not self.folder.is_dir():
            return []
        return [self._load(p) for p in sorted(self.folder.glob("*.key"))]

    def _load(self, path: Path) -> Signer:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        return Signer.from_doc(doc, source=str(path))

    def get(self, name: str | None = None) -> Signer:
        """The key named `name`, or the only one there is."""
        if name is not None:
            path = self.path(name)
            if not path.is_file():
                raise NotFound(f"no signing key named {name!r} in {self.folder} (make one: tuxpilot key new {name})")
            return self._load(path)
        found = self.all()
        if len(found) != 1:
            names = ", ".join(s.name for s in found) or "none"
            raise ConfigError(f"name the signing key to use (--key); {self.folder} has: {names}"
                              if found else f"no signing key in {self.folder}: make one with `tuxpilot key new NAME`")
        return found[0]


class TrustStore:
    """The publishers this host accepts packages from: `<folder>/<key id>.pub`, one JSON document each.

    As root the agent reads the host's store (`<state dir>/keys/trusted`, or `marketplace.trusted_keys`);
    a package is verified against the store of whoever verifies it, never against keys it carries.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def trust(self, key: PublicKey) -> bool:
        """Add `key`; False when it was trusted already (under any name)."""
        path = self.folder / f"{key.id}.pub"
        known = self.get(key.id)
        if known is not None and known.key == key.key:
            return False
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(self.folder, self.folder.stat().st_mode & 0o755)  # a umask of 002 must not open it to a group
        doc = {"algorithm": ALGORITHM, "name": key.name, "key_id": key.id, "public_key": _b64(key.key)}
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        _write_new(tmp, json.dumps(doc, indent=2) + "\n", 0o644)
        tmp.replace(path)
        return True

    def untrust(self, ident: str) -> PublicKey:
        """Remove the key with this id or name."""
        for key in self.all():
            if ident in (key.id, key.name):
                (self.folder / f"{key.id}.pub").unlink()
                return key
        raise NotFound(f"no trusted key with id or name {ident!r} in {self.folder}")

    def _guarded(self, path: Path) -> None:
        """A trust store others may write to trusts whoever writes to it: refused, as is one another user owns
        when root reads it (the agent installing as root)."""
        st = path.stat()
        if st.st_mode & 0o022:
            raise ConfigError(f"{path} is writable by group or others (mode {st.st_mode & 0o777:o}): "
                              "anyone who can write there could add a publisher; chmod go-w it")
        if os.geteuid() == 0 and st.st_uid != 0:
            raise ConfigError(f"{path} is owned by uid {st.st_uid}, not root: root trusts only keys root placed")

    def get(self, ident: str) -> PublicKey | None:
        if not re.fullmatch(r"[0-9a-f]{16}", ident):
            return None
        if not self.folder.is_dir():
            return None
        self._guarded(self.folder)
        path = self.folder / f"{ident}.pub"
        if not path.is_file():
            return None
        key = self._load(path)
        # A file renamed to another key's id must not vouch for that key.
        return key if key.id == ident else None

    def all(self) -> list[PublicKey]:
        if not self.folder.is_dir():
            return []
        self._guarded(self.folder)
        return [self._load(p) for p in sorted(self.folder.glob("*.pub"))]

    def _load(self, path: Path) -> PublicKey:
        self._guarded(path)
        try:
            doc = json.loads(path.read_text())
            return PublicKey(doc["name"], base64.b64decode(doc["public_key"], validate=True))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a trusted key ({type(exc).__name__}: {exc})") from exc
