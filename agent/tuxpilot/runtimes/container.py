"""The `container` runtime: not available yet. A manifest asking for it is refused when the plugin is
loaded."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Launch, Runtime


class Container(Runtime):
    name: ClassVar[str] = "container"

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        return "this TuxPilot has no container runtime yet"

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        raise RuntimeError(self.missing(folder, manifest, path))
