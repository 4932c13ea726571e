"""The `wasm` runtime: not available yet, so a manifest asking for it is refused when loaded."""

from __future__ import annotations

from typing import ClassVar

from tuxpilot.runtimes.base import Unavailable


class Wasm(Unavailable):
    name: ClassVar[str] = "wasm"
    lacking: ClassVar[str] = "this TuxPilot has no WebAssembly runtime yet"
