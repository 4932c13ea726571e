"""The `python` runtime: the plugin's entry point imported by the Python SDK, in the agent's own
interpreter (`python -m tuxpilot.sdk.process FOLDER`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Launch, Runtime

# The module a Python plugin process starts with; the probe imports it as the plugin's user.
PROCESS_MODULE = "tuxpilot.sdk.process"


class Python(Runtime):
    name: ClassVar[str] = "python"

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        env = {}
        if "memory_mb" in limits:
            # RLIMIT_AS counts address space: glibc's per-thread malloc arenas (64 MiB each) would
            # use it up long before memory is, so a limited plugin keeps to two.
            env["MALLOC_ARENA_MAX"] = "2"
        return Launch([sys.executable, "-m", PROCESS_MODULE, str(folder)], env, dict(limits))

    def probe(self, path: str) -> list[str] | None:
        return [sys.executable, "-c", f"import {PROCESS_MODULE}"]
