"""Every manifest runtime, by name."""

from __future__ import annotations

from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes.base import Runtime
from tuxpilot.runtimes.container import Container
from tuxpilot.runtimes.javascript import JavaScript
from tuxpilot.runtimes.native import Native
from tuxpilot.runtimes.python import Python
from tuxpilot.runtimes.wasm import Wasm

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (Python(), JavaScript(), Native(), Wasm(), Container())}


def runtime_of(manifest: Manifest) -> Runtime:
    return RUNTIMES[manifest.runtime]
