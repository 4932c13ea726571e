"""TuxPilot: an event-driven automation agent for Linux fleets on the NATS message bus.

Plugin authors write `from tuxpilot import Plugin`; the SDK is imported on first use, so the agent and
the CLI do not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tuxpilot.sdk import ActionError, Context, Event, Plugin, ProposedAction, Result, sibling

__all__ = ["ActionError", "Context", "Event", "Plugin", "ProposedAction", "Result", "__version__", "sibling"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tuxpilot import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'tuxpilot' has no attribute {name!r}")
