"""The `native` runtime: the entry point is a program the kernel runs itself (an executable, or a
script with a `#!` line)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Launch, Runtime


def is_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


class Native(Runtime):
    name: ClassVar[str] = "native"

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        entry = folder / manifest.entry_point
        if entry.is_file() and not entry.stat().st_mode & 0o111:
            return f"its entry point {entry} is not executable (chmod +x)"
        return super().missing(folder, manifest, path)

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        return Launch([str(folder / manifest.entry_point)], {}, dict(limits))

    def needs(self, folder: Path, manifest: Manifest) -> list[tuple[Path, int]]:
        entry = folder / manifest.entry_point
        return [(entry, os.X_OK | (os.R_OK if is_script(entry) else 0))]
