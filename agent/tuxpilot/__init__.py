"""TuxPilot: an event-driven automation agent for Linux fleets on the NATS message bus.

Plugin authors write `from tuxpilot import Plugin`; the SDK is imported on first use, so the agent and
the CLI do not pay for it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _structlog_without_rich() -> None:
    """Import structlog with rich hidden from it.

    structlog imports rich, when installed (the CLI's tables need it), for pretty tracebacks and
    reprs that TuxPilot never renders (`log.setup` prints plain tracebacks): rich, pygments and attrs
    then cost every process ~4 MB of RSS and ~60 ms at start, plugin processes that never draw a
    table included. rich itself stays importable for whoever uses it.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_structlog_without_rich()

if TYPE_CHECKING:
    from tuxpilot.sdk import ActionError, Context, Event, Plugin, ProposedAction, Result, sibling

__all__ = ["ActionError", "Context", "Event", "Plugin", "ProposedAction", "Result", "__version__", "sibling"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tuxpilot import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'tuxpilot' has no attribute {name!r}")
