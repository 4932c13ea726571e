"""The exception hierarchy, and its one mapping to the wire's `error` document."""

from __future__ import annotations

from typing import Any

# Error codes to the numeric code carried in the NATS micro `Nats-Service-Error-Code` header.
PLUGIN_STATUS_CODES: dict[str, int] = {
    "bad_request": 400,
    "invalid_params": 400,
    "invalid_config": 400,
    "forbidden": 403,
    "not_found": 404,
    "unknown_plugin": 404,
    "unknown_action": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
    # A sandboxed plugin's guest: hit its memory or fuel cap, or trapped / answered garbage.
    "resource_exhausted": 507,
    "plugin_fault": 502,
    # An installed or updated plugin that did not start or answer its health check (undone, or rolled back).
    "unhealthy": 502,
    # A package the host will not install: integrity, signature, trust, unsafe contents, dependencies.
    "package_refused": 422,
}
# The gate's reasons, as it answers an operator's call on the public endpoint that it does not execute.
GATE_STATUS_CODES: dict[str, int] = {
    "impersonation": 403,
    "foreign_action": 403,
    "permission_not_granted": 403,
    "no_caller": 400,
    "already_claimed": 409,
    "event_expired": 410,
    "cooldown": 429,
    "fleet_limit": 429,
    "rate_limited": 429,
    "bad_reply": 502,
    "no_responders": 503,
    "unrecordable": 500,
}
STATUS_CODES: dict[str, int] = {**PLUGIN_STATUS_CODES, **GATE_STATUS_CODES}


class TuxPilotError(Exception):
    """An error with a code that travels: raised in code, sent as an `error` document."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    @property
    def status(self) -> int:
        return STATUS_CODES.get(self.code, 500)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            doc["details"] = self.details
        return doc


class BadRequest(TuxPilotError):
    code = "bad_request"


class InvalidParams(TuxPilotError):
    code = "invalid_params"


class PayloadTooLarge(TuxPilotError):
    code = "payload_too_large"


class NotFound(TuxPilotError):
    code = "not_found"


class Forbidden(TuxPilotError):
    code = "forbidden"


class Conflict(TuxPilotError):
    code = "conflict"


class Unavailable(TuxPilotError):
    code = "unavailable"


class ConfigError(TuxPilotError):
    code = "invalid_config"


class InvalidSchema(ConfigError):
    """A JSON Schema that cannot be compiled: malformed, or a `$ref` that leaves the document."""


def error_doc(exc: BaseException) -> dict[str, Any]:
    """The `error` document for any exception; unexpected ones say only their type."""
    if isinstance(exc, TuxPilotError):
        return exc.to_doc()
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"[:4096]}
