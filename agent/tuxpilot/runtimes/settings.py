"""The settings of the plugin host: each plugin's grants and settings, confinement, supervision."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from tuxpilot.protocol.manifest import DANGEROUS, Limits, Manifest, Permission
from tuxpilot.settings import NodeSettings, Seconds, Section


class PluginSettings(Section):
    enabled: bool = True
    permissions: list[Permission] | None = Field(
        None, description="Granted permissions; unset: the manifest's non-dangerous ones."
    )
    config: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(None, description="Run this plugin as this user instead of confinement.user.")
    groups: list[str] = Field(
        default_factory=list, description='Supplementary groups of the plugin process, e.g. ["docker"].'
    )
    folder: Path | None = Field(
        None,
        description="When several plugin folders hold a plugin of this name: the one to load (the others are "
        "refused). Unset: a built-in wins over a folder in plugin_dirs.",
    )
    sandbox_dirs: list[Path] = Field(
        default_factory=list,
        description="A wasm plugin's directories: seen read-only with filesystem_read granted, writable with "
        "filesystem_write, not at all without either.",
    )
    cpus: Annotated[float, Field(gt=0, le=1024)] = Field(
        1.0, description="A container plugin's CPU share (docker --cpus).",
    )
    history: bool = Field(
        False,
        description="A new plugin's consumer starts at the oldest event kept instead of at new events.",
    )

    def granted(self, manifest: Manifest) -> frozenset[Permission]:
        if self.permissions is not None:
            return frozenset(self.permissions)
        return frozenset(p for p in manifest.permissions if p not in DANGEROUS)


class ConfinementConfig(Section):
    """How local plugin processes are confined: the user they run as, their rlimits."""

    user: str | None = Field(
        None,
        description="One user every plugin runs as when the agent runs as root; unset: each plugin runs as a "
        "user of its own, user_prefix + its name (created when missing), so that no plugin can trace, signal "
        "or read another.",
    )
    user_prefix: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,15}$")] = Field(
        "tuxpilot-p-", description="Prefix of each plugin's own user."
    )
    strict: bool = Field(
        False,
        description="Refuse to start a plugin that cannot run as `user`; false: run it as root, with a warning.",
    )
    default_limits: Limits = Field(
        Limits(memory_mb=2048, open_files=1024),
        description="rlimits of a plugin whose manifest sets none: memory_mb is address space (RLIMIT_AS).",
    )
    max_limits: Limits = Field(
        Limits(memory_mb=8192, open_files=65536, processes=4096),
        description="The most a manifest may ask for; more is cut down to this. Unset: no cap.",
    )


class SupervisionConfig(Section):
    """How the plugin host restarts plugin processes and when it calls a crash loop."""

    backoff_start_s: Seconds = 0.5
    backoff_max_s: Seconds = 60.0
    healthy_after_s: Seconds = Field(
        30.0, description="A plugin up this long is healthy again: its backoff starts over, a crash loop is over."
    )
    crash_loop_restarts: Annotated[int, Field(ge=1)] = Field(
        5, description="This many exits within crash_loop_window_s is a crash loop (a plugin.crash_loop event)."
    )
    crash_loop_window_s: Seconds = 60.0


# useradd refuses longer names.
MAX_USER_NAME = 32


def own_user(prefix: str, plugin: str) -> str:
    """The name of a plugin's own user: prefix + plugin name, shortened with a hash to fit useradd."""
    name = prefix + plugin
    if len(name) <= MAX_USER_NAME:
        return name
    digest = hashlib.sha256(plugin.encode()).hexdigest()[:8]
    return f"{prefix}{plugin[: MAX_USER_NAME - len(prefix) - 9]}-{digest}"


class HostSettings(NodeSettings):
    """What the plugin host needs of the agent's configuration."""

    plugins: dict[str, PluginSettings] = Field(default_factory=dict)
    confinement: ConfinementConfig = ConfinementConfig()
    supervision: SupervisionConfig = SupervisionConfig()

    def plugin(self, name: str) -> PluginSettings:
        return self.plugins.get(name) or PluginSettings()

    def plugin_user(self, name: str) -> str:
        """Who the plugin runs as when the agent runs as root: [plugins.<name>] user, else confinement.user,
        else a user of its own."""
        return self.plugin(name).user or self.confinement.user or own_user(self.confinement.user_prefix, name)
