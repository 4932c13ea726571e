"""Where the files TuxPilot ships (schemas, built-in plugins) are, in a checkout and in a wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # tuxpilot/


def shipped(name: str) -> Path:
    """The folder `schemas` or `plugins`: inside the package when installed, beside it in a checkout."""
    # Installed: tuxpilot/_data/<name>; in a checkout: <repo>/<name>, beside agent/tuxpilot.
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped folder {name!r} not found for {_PACKAGE}")
