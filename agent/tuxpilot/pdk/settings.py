"""The host config's `[marketplace]` section: where keys live, whether unsigned packages are accepted,
and the registries packages are published to and installed from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Protocol

from pydantic import Field, model_validator

from tuxpilot.protocol.errors import ConfigError
from tuxpilot.settings import NatsConfig, Section, StreamsConfig

# The registry every host has without configuring one: the packages bucket on its own bus.
FLEET_REGISTRY = "fleet"


class RegistryConfig(Section):
    """One registry: a folder (`path`, for air-gapped hosts), else an object store bucket on the host's bus."""

    path: Path | None = Field(None, description="A folder of packages and their index entries.")
    bucket: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] | None = Field(
        None, description="The object store bucket on the host's bus; unset: <prefix>_packages."
    )
    max_bytes: Annotated[int, Field(ge=1024 * 1024)] = Field(
        1024 * 1024 * 1024, description="Size of the bucket, when this registry creates it."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RegistryConfig:
        if self.path is not None and self.bucket is not None:
            raise ValueError("a registry is a folder (path) or a bucket, not both")
        return self


class MarketplaceConfig(Section):
    allow_unsigned: bool = Field(
        False, description="Install packages without a signature, or signed by a key this host does not trust."
    )
    trusted_keys: Path | None = Field(
        None, description="The publishers' public keys this host trusts; unset: <state_dir>/keys/trusted."
    )
    signing_keys: Path | None = Field(
        None, description="This user's own signing keys (`tuxpilot key new`); unset: <state_dir>/keys/signing."
    )
    registry: str = Field(FLEET_REGISTRY, description="The registry used when a command names none.")
    registries: dict[str, RegistryConfig] = Field(default_factory=dict)


class MarketHost(Protocol):
    """What the marketplace needs of a host's configuration (the agent's Config has it)."""

    @property
    def marketplace(self) -> MarketplaceConfig: ...

    @property
    def state_dir(self) -> Path: ...

    @property
    def subject_prefix(self) -> str: ...

    @property
    def host_id(self) -> str: ...

    @property
    def nats(self) -> NatsConfig: ...

    @property
    def streams(self) -> StreamsConfig: ...


def trusted_keys_dir(config: MarketHost) -> Path:
    return config.marketplace.trusted_keys or config.state_dir / "keys" / "trusted"


def signing_keys_dir(config: MarketHost) -> Path:
    return config.marketplace.signing_keys or config.state_dir / "keys" / "signing"


def registry_config(config: MarketHost, name: str | None) -> tuple[str, RegistryConfig]:
    """The registry named `name` (None: the default one). `fleet` exists unless configured otherwise."""
    chosen = name or config.marketplace.registry
    known = config.marketplace.registries
    if chosen in known:
        return chosen, known[chosen]
    if chosen == FLEET_REGISTRY:
        return chosen, RegistryConfig()
    names = sorted({*known, FLEET_REGISTRY})
    raise ConfigError(f"no registry named {chosen!r} (configured: {', '.join(names)}); "
                      f"add [marketplace.registries.{chosen}] to the host config")
