"""The `wasm` runtime: not available yet. A manifest asking for it is refused when the plugin is loaded,
instead of the host exec'ing a `.wasm` file and crash-looping on EACCES."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Launch, Runtime


class Wasm(Runtime):
    name: ClassVar[str] = "wasm"

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        return "this TuxPilot has no WebAssembly runtime yet"

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        raise RuntimeError(self.missing(folder, manifest, path))
