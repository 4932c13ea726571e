"""The `javascript` runtime: the entry point run by `node` from the plugin's PATH.

V8 reserves a large code range up front, and under an `RLIMIT_AS` below ~1 GiB node fails to start:
the manifest's `memory_mb` becomes V8's heap limit (`--max-old-space-size`) instead of an address-space
rlimit. The other limits are rlimits as for any process.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Launch, Runtime, which

NODE = "node"


class JavaScript(Runtime):
    name: ClassVar[str] = "javascript"

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        if which(NODE, path) is None:
            return f"{NODE} is not on PATH ({path or 'empty'}): install Node.js or add its directory to PATH"
        return super().missing(folder, manifest, path)

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        node = which(NODE, path) or NODE
        rlimits = {k: v for k, v in limits.items() if k != "memory_mb"}
        flags = [f"--max-old-space-size={limits['memory_mb']}"] if "memory_mb" in limits else []
        return Launch([node, *flags, str(folder / manifest.entry_point)], {}, rlimits)

    def probe(self, path: str) -> list[str] | None:
        return [which(NODE, path) or NODE, "--version"]
