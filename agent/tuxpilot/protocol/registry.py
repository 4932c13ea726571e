"""The registry entry: what the agent stores under `<host>.<plugin>` in the registry bucket for each
plugin its host loaded. Mirrors `schemas/registry.json`; written by the agent only, read by the gate,
`tuxpilot status`, `tuxpilot call` and anyone watching the bucket."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import AwareDatetime, Field, ValidationError

from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import BadRequest, ConfigError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.models import Doc, Token, now

# A manifest with every action's schema fits comfortably; the bucket refuses nothing smaller than this.
MAX_ENTRY_BYTES = 1024 * 1024


class RegistryEntry(Doc):
    host: Token
    plugin: Token
    manifest: Manifest
    time: AwareDatetime = Field(default_factory=now)

    @classmethod
    def of(cls, host: str, manifest: Manifest) -> RegistryEntry:
        return cls(host=host, plugin=manifest.name, manifest=manifest)

    def to_doc(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "plugin": self.plugin,
            "manifest": self.manifest.to_doc(),
            "time": self.time.isoformat(),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_doc()).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RegistryEntry:
        """An entry read from the bucket: valid under `registry.json`, else BadRequest saying why."""
        doc = schemas.parse(raw, what="registry entry", limit=MAX_ENTRY_BYTES)
        problems = schemas.validator("registry").errors(doc)
        if problems:
            raise BadRequest(f"registry entry is invalid at {problems[0]['path']}: {problems[0]['message']}",
                             details={"errors": problems})
        try:
            entry = cls(
                host=doc["host"],
                plugin=doc["plugin"],
                manifest=Manifest.from_doc(doc["manifest"], source="registry entry"),
                time=doc["time"],
            )
        except ConfigError as exc:
            raise BadRequest(exc.message, details=exc.details) from None
        except ValidationError as exc:
            raise BadRequest(f"registry entry: {exc.errors()[0]['msg']}") from None
        if entry.plugin != entry.manifest.name:
            raise BadRequest(f"registry entry of {entry.plugin!r} holds the manifest of {entry.manifest.name!r}")
        return entry


# The `tuxpilot` key of a micro service's metadata says what kind of TuxPilot service it is.
KIND_KEY = "tuxpilot"
PLUGIN_KIND = "plugin"
GATE_KIND = "gate"


class Announcement(Doc):
    """A plugin instance's announcement: the metadata of its NATS micro service (`$SRV.INFO`, `$SRV.PING`).
    Information for `status`, never trusted by the gate; every value is a string, as micro requires."""

    host: str
    plugin: str
    version: str
    instance: str
    api_version: str
    user: str
    pid: str

    # What each key means, for the protocol documents (docs/protocol.md, the AsyncAPI document).
    MEANING: ClassVar[dict[str, str]] = {
        KIND_KEY: f"Always `{PLUGIN_KIND}`.",
        "host": "The host id.",
        "plugin": "The plugin's name.",
        "version": "The manifest's version.",
        "instance": "A random id of this process.",
        "api_version": "The manifest's api_version.",
        "user": "The OS user the process really runs as.",
        "pid": "The process id.",
    }

    def to_metadata(self) -> dict[str, str]:
        return {KIND_KEY: PLUGIN_KIND, **self.model_dump()}

    @staticmethod
    def is_plugin(metadata: dict[str, Any] | None, host: str | None = None) -> bool:
        """Whether `metadata` announces a plugin instance (of `host`, if given): a gate answers the same pings."""
        meta = metadata or {}
        return meta.get(KIND_KEY) == PLUGIN_KIND and (host is None or meta.get("host") == host)
