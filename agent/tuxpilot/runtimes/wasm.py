"""The `wasm` runtime: the entry point is a WebAssembly module run by wasmtime inside a plugin process
(`python -m tuxpilot.sdk.wasm FOLDER`), which speaks the protocol through the Python SDK.

The manifest's `memory_mb` caps the guest's linear memory (wasmtime's Store limits), not the process's
address space: wasmtime reserves address space for each memory and its guard pages, and an
RLIMIT_AS at the guest's size would stop the host process instead of the guest. The other limits stay
rlimits of the process; `cpu_s` also becomes each call's fuel.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import ClassVar

from tuxpilot.protocol.manifest import Manifest, Permission
from tuxpilot.runtimes.base import Launch, Runtime

PROCESS_MODULE = "tuxpilot.sdk.wasm"


class Wasm(Runtime):
    name: ClassVar[str] = "wasm"

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        if importlib.util.find_spec("wasmtime") is None:
            return "the wasmtime Python package is not installed (pip install wasmtime)"
        problem = super().missing(folder, manifest, path)
        if problem is not None:
            return problem
        import wasmtime  # only where a wasm plugin is loaded

        entry = folder / manifest.entry_point
        try:
            wasmtime.Module.validate(wasmtime.Engine(), entry.read_bytes())
        except (wasmtime.WasmtimeError, OSError) as exc:
            return f"its entry point {entry} is not a valid WebAssembly module: {str(exc).splitlines()[0][:200]}"
        return None

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        rlimits = {k: v for k, v in limits.items() if k != "memory_mb"}
        return Launch([sys.executable, "-m", PROCESS_MODULE, str(folder)], {}, rlimits)

    def probe(self, path: str) -> list[str] | None:
        return [sys.executable, "-c", f"import {PROCESS_MODULE}"]


def sandbox_dirs(dirs: list[Path], granted: frozenset[Permission]) -> list[dict[str, object]]:
    """The host-configured directories a wasm guest sees, by its grants: none without a filesystem
    permission, read-only with filesystem_read, writable only with filesystem_write."""
    write = Permission.filesystem_write in granted
    if not write and Permission.filesystem_read not in granted:
        return []
    return [{"host": str(d), "guest": str(d), "write": write} for d in dirs]
