"""Where the files TuxPilot ships (schemas, built-in plugins) are, in a checkout and in a wheel."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The folder `schemas` or `plugins`: inside the package when installed, beside it in a checkout."""
    for candidate in (_HERE / "_data" / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped folder {name!r} not found next to {_HERE}")
