"""The `container` runtime: not available yet, so a manifest asking for it is refused when loaded."""

from __future__ import annotations

from typing import ClassVar

from tuxpilot.runtimes.base import Unavailable


class Container(Unavailable):
    name: ClassVar[str] = "container"
    lacking: ClassVar[str] = "this TuxPilot has no container runtime yet"
