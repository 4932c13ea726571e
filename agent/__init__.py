"""TuxPilot: an event-driven automation agent for Linux fleets on the NATS message bus."""

__version__ = "0.1.0"
