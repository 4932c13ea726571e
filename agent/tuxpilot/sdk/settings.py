"""What a plugin process is told by its host (or, under `tuxpilot plugin run`, by the host's config
file): the node settings every process shares, and its own plugin's settings. Never the agent's
configuration: a plugin sees its own section and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tuxpilot.settings import NodeSettings, load_settings


class PluginSection(BaseModel):
    """A plugin's own settings; the host-only keys of `[plugins.<name>]` (grants, user) are not read."""

    model_config = ConfigDict(extra="ignore")

    config: dict[str, Any] = Field(default_factory=dict)


class PluginProcessSettings(NodeSettings):
    plugins: dict[str, PluginSection] = Field(default_factory=dict)

    def plugin(self, name: str) -> PluginSection:
        return self.plugins.get(name) or PluginSection()

    @classmethod
    def of(cls, node: NodeSettings) -> PluginProcessSettings:
        """The part of a host's settings (`node`, e.g. the agent's configuration) a plugin process gets."""
        return cls.model_validate(node.model_dump(include=set(cls.model_fields)))


def load_plugin_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> PluginProcessSettings:
    """A plugin process's settings from its environment (and the config file, where one is in force)."""
    return load_settings(PluginProcessSettings, path, environ, partial=True)
