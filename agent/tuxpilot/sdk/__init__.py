"""The Python plugin SDK: the protocol and the plumbing only, never the agent."""

from tuxpilot.protocol.models import Event, ProposedAction, Result
from tuxpilot.sdk.plugin import ActionError, Context, Plugin, sibling

__all__ = ["ActionError", "Context", "Event", "Plugin", "ProposedAction", "Result", "sibling"]
