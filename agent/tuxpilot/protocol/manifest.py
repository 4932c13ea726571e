"""The plugin manifest (`plugin.toml`): its model, loading a plugin folder, finding plugins."""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.models import Token
from tuxpilot.protocol.resources import shipped

MANIFEST_FILE = "plugin.toml"
API_VERSION = "1"
# The protocol versions (docs/protocol.md) this TuxPilot speaks; a plugin of another one is refused at load.
API_VERSIONS = frozenset({API_VERSION})


class Permission(StrEnum):
    system_access = "system_access"
    filesystem_read = "filesystem_read"
    filesystem_write = "filesystem_write"
    network_access = "network_access"
    process_management = "process_management"
    service_management = "service_management"
    user_management = "user_management"
    configuration_access = "configuration_access"


# Never granted unless the operator says so by name.
DANGEROUS = frozenset(
    {
        Permission.system_access,
        Permission.process_management,
        Permission.service_management,
        Permission.user_management,
        Permission.filesystem_write,
    }
)

SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"

Category = Literal[
    "monitoring", "integration", "automation", "security", "development", "cloud",
    "networking", "storage", "virtualization", "custom",
]
Runtime = Literal["python", "javascript", "wasm", "container", "native"]
# Subjects of this host a plugin may read (subscribe to) besides its events: what `reads` may name.
# approvals: the host's approval requests (tuxpilot.approval.<host>.*), to forward them to people, say.
Readable = Literal["results", "metrics", "approvals"]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dependency(Spec):
    name: str
    version: str | None = None
    kind: Literal["system", "python", "npm", "plugin"] | None = None


class FleetLimit(Spec):
    """At most `max` hosts, or `percent` % of the alive hosts, of one group run the action at once. The group:
    the hosts with `labels` (a host policy names them), or those sharing this host's values of the labels in
    `group_by` (a manifest cannot know a site's labels); neither: every host of the fleet."""

    max: Annotated[int, Field(ge=1)] | None = None
    percent: Annotated[float, Field(gt=0, le=100)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    group_by: list[str] = Field(default_factory=list)
    lease_s: Annotated[float, Field(ge=1, le=86400)] | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> FleetLimit:
        if (self.max is None) == (self.percent is None):
            raise ValueError("a fleet limit sets exactly one of max and percent")
        return self


class ActionSpec(Spec):
    description: str = ""
    permission: Permission | None = None
    params: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    result: dict[str, Any] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    cooldown_s: Annotated[float, Field(ge=0)] | None = None
    dry_run: bool | None = None
    fleet_limit: FleetLimit | None = None


class Limits(Spec):
    memory_mb: Annotated[int, Field(ge=16)] | None = None
    cpu_s: Annotated[int, Field(ge=1)] | None = None
    open_files: Annotated[int, Field(ge=16)] | None = None
    processes: Annotated[int, Field(ge=1)] | None = None


class Manifest(Spec):
    name: Token
    version: Annotated[str, Field(pattern=SEMVER)]
    description: str
    author: str | None = None
    license: str | None = None
    homepage: str | None = None
    category: Category
    runtime: Runtime
    entry_point: str
    # runtime = "container": the image the host runs (entry_point is then an image tarball for `docker load`).
    image: str | None = None
    api_version: Annotated[str, Field(pattern=r"^[0-9]+$")] = API_VERSION
    dependencies: list[Dependency] = Field(default_factory=list)
    permissions: list[Permission] = Field(default_factory=list)
    subscribes: list[Annotated[str, Field(pattern=r"^([a-z0-9_-]{1,64}|\*)\.([a-z0-9_-]{1,64}|\*)$")]] = Field(
        default_factory=list
    )
    emits: list[Token] = Field(default_factory=list)
    reads: list[Readable] = Field(default_factory=list)
    actions: dict[Token, ActionSpec] = Field(default_factory=dict)
    commands: list[str] = Field(default_factory=list)
    limits: Limits | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    _validators: dict[str, schemas.Validator] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: dict[str, Any], *, source: str = "manifest") -> Manifest:
        """Validate against the manifest schema first (the contract), then build the model."""
        problems = schemas.validator("manifest").errors(doc)
        if problems:
            first = problems[0]
            raise ConfigError(f"{source}: {first['path']}: {first['message']}", details={"errors": problems})
        try:
            manifest = cls.model_validate(doc)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {exc.errors()[0]['msg']}") from exc
        if manifest.api_version not in API_VERSIONS:
            raise ConfigError(
                f"{source}: api_version {manifest.api_version!r} is not a protocol version this TuxPilot speaks "
                f"({', '.join(sorted(API_VERSIONS))})"
            )
        if (manifest.runtime == "container") != (manifest.image is not None):
            raise ConfigError(f"{source}: runtime 'container' and `image` go together: a container plugin names "
                              "its image, no other runtime has one")
        for action, spec in manifest.actions.items():
            if spec.permission is not None and spec.permission not in manifest.permissions:
                raise ConfigError(
                    f"{source}: action {action!r} needs {spec.permission.value!r}, "
                    "which the manifest's permissions do not list"
                )
            # Compiled now, so a schema that cannot be used (a `$ref` leaving the document) refuses the
            # manifest at load instead of the first call.
            try:
                manifest.params_validator(action)
            except ConfigError as exc:
                raise ConfigError(f"{source}: action {action!r}: {exc.message}") from None
        return manifest

    def to_doc(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def params_validator(self, action: str) -> schemas.Validator:
        """The compiled params schema of `action`, compiled once per manifest."""
        found = self._validators.get(action)
        if found is None:
            found = schemas.Validator(self.actions[action].params, what=f"params of {self.name}.{action}")
            self._validators[action] = found
        return found


def load(folder: Path) -> Manifest:
    """Read and validate `folder/plugin.toml`; its entry point must lie inside the folder."""
    path = folder / MANIFEST_FILE
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no plugin manifest here") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    manifest = Manifest.from_doc(doc, source=str(path))
    entry_point_inside(folder, manifest.entry_point, source=str(path))
    return manifest


def entry_point_inside(folder: Path, entry_point: str, *, source: str) -> Path:
    """The entry point's real path, which must be inside the plugin's folder once every symlink is
    resolved: a manifest must not make the host run (or hand to the plugin's user) a file elsewhere."""
    base = folder.resolve()
    real = (base / entry_point).resolve()
    if real == base or not real.is_relative_to(base):
        raise ConfigError(f"{source}: entry_point {entry_point!r} leads outside the plugin folder ({real})")
    return real


def builtin_dir() -> Path:
    return shipped("plugins")
