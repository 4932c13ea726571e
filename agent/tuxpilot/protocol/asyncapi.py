"""The plugin protocol as an AsyncAPI 3.0 document, generated from the JSON Schemas in `schemas/` and the
subject builders in `names.py`, so it cannot drift from either. `tuxpilot schema asyncapi` prints it;
`docs/protocol.md` is the prose beside it.

The document describes one application, a plugin: what it receives (its events, execution requests,
discovery requests) and sends (proposals, replies, the events it may emit). The other subjects of the
bus (the public action endpoint, the audit trail, metrics, the registry) are channels without
operations, for reference.
"""

from __future__ import annotations

from typing import Any

from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from tuxpilot import __version__
from tuxpilot.protocol import schemas
from tuxpilot.protocol.errors import GATE_STATUS_CODES, PLUGIN_STATUS_CODES
from tuxpilot.protocol.manifest import API_VERSION
from tuxpilot.protocol.names import (
    ACTION_ID_HEADER,
    EVENT_ID_HEADER,
    MSG_ID_HEADER,
    Names,
    Subjects,
    plugin_consumer_name,
    proposal_id,
    registry_key,
)
from tuxpilot.protocol.registry import Announcement

ASYNCAPI_VERSION = "3.0.0"
# The schemas are JSON Schema 2020-12, which AsyncAPI carries as a multi-format schema.
JSON_SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"

PARAMETERS = {
    "host": "The host id: one subject token [a-z0-9_-].",
    "plugin": "The plugin's name, from its manifest.",
    "action": "An action the plugin's manifest declares.",
    "category": "The event's category, e.g. memory.",
    "name": "The event's name within its category, e.g. high.",
}


def _p(name: str) -> str:
    return "{" + name + "}"


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


def _strings(described: dict[str, str]) -> dict[str, Any]:
    return {name: {"type": "string", "description": text} for name, text in described.items()}


def _channel(address: str | None, description: str, messages: list[str]) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {m: _ref("components", "messages", m) for m in messages},
    }
    used = [name for name in PARAMETERS if address is not None and _p(name) in address]
    if used:
        channel["parameters"] = {name: _ref("components", "parameters", name) for name in used}
    return channel


def _schema(name: str) -> dict[str, Any]:
    return {"schemaFormat": JSON_SCHEMA_FORMAT, "schema": schemas.load(name)}


def _messages() -> dict[str, Any]:
    msg_id = {MSG_ID_HEADER: "The event id: the events stream stores an id once within its duplicate window."}
    error_headers = {
        ERROR_HEADER: "The error's message on one line, at most 1,000 characters.",
        ERROR_CODE_HEADER: "The error's number: " + ", ".join(f"{c} {n}" for c, n in PLUGIN_STATUS_CODES.items())
        + "; a plugin's own code is sent as 500.",
    }
    return {
        "event": {
            "name": "event",
            "title": "Event",
            "headers": {"type": "object", "properties": _strings(msg_id)},
            "payload": _ref("components", "schemas", "event"),
        },
        "metrics": {"name": "metrics", "title": "Metrics", "payload": _ref("components", "schemas", "metrics")},
        "proposal": {
            "name": "proposal",
            "title": "Proposal",
            "description": "Proposed actions of the publishing plugin, for one event; the proposer is the subject's "
            "last token, and the body's `plugin` must equal it.",
            "headers": {
                "type": "object",
                "properties": {
                    MSG_ID_HEADER: {
                        "type": "string",
                        "description": "The proposal id, " + proposal_id(_p("event_id"), _p("plugin"))
                        + ": the proposals stream stores a redelivered event's proposal once.",
                    }
                },
            },
            "payload": _ref("components", "schemas", "proposal"),
        },
        "handoffAnswer": {
            "name": "handoffAnswer",
            "title": "The gate's answer to a proposal handed over",
            "description": "decided: its records are stored (ack the event); retry: nothing was decided (store the "
            "proposal on the proposal subject, then ack).",
            "payload": {
                "oneOf": [
                    {"type": "object", "required": ["decided"], "additionalProperties": False,
                     "properties": {"decided": {"type": "integer", "minimum": 0}}},
                    {"type": "object", "required": ["retry"], "additionalProperties": False,
                     "properties": {"retry": {"type": "string", "enum": ["busy", "bus_unavailable"]}}},
                ],
            },
        },
        "params": {
            "name": "params",
            "title": "Action params",
            "description": "A JSON object valid under the action's params schema (from the manifest); an empty body "
            "means {}. Top-level defaults are filled in before the handler runs.",
            "headers": {
                "type": "object",
                "properties": {
                    ACTION_ID_HEADER: {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9_-]{1,128}$",
                        "description": "Always sent by the gate. The same id for the same action gets the first "
                        "run's reply; the same id for another action is refused (conflict, 409).",
                    },
                    EVENT_ID_HEADER: {"type": "string", "description": "The event that caused the action, if any."},
                },
            },
            "payload": {"type": "object"},
        },
        "result": {
            "name": "result",
            "title": "Result",
            "description": "A successful reply ({\"status\": \"ok\", \"data\": ...}), or the gate's audit record.",
            "payload": _ref("components", "schemas", "result"),
        },
        "error": {
            "name": "error",
            "title": "Error reply",
            "description": "Every failed request's reply: the error document, and the micro error headers.",
            "headers": {
                "type": "object",
                "required": [ERROR_HEADER, ERROR_CODE_HEADER],
                "properties": _strings(error_headers),
            },
            "payload": _ref("components", "schemas", "error"),
        },
        "registry": {
            "name": "registry",
            "title": "Registry entry",
            "description": "Written by the agent only, from the manifests its host loaded.",
            "payload": _ref("components", "schemas", "registry"),
        },
        "discovery": {
            "name": "discovery",
            "title": "Discovery request",
            "description": "An empty request; every micro service answers.",
            "payload": {"type": "string", "maxLength": 0},
        },
        "info": {
            "name": "info",
            "title": "Service info",
            "description": "The micro framework's io.nats.micro.v1.info_response; a plugin's metadata is its "
            "announcement.",
            "payload": {
                "type": "object",
                "required": ["type", "name", "id", "version", "metadata"],
                "properties": {
                    "type": {"const": "io.nats.micro.v1.info_response"},
                    "name": {"type": "string", "description": "The plugin's name."},
                    "id": {"type": "string"},
                    "version": {"type": "string", "description": "The manifest's version."},
                    "metadata": _ref("components", "schemas", "pluginMetadata"),
                    "endpoints": {"type": "array", "description": "One per action, on its exec subject, queue group = "
                                  "the plugin's name."},
                },
            },
        },
    }


def _plugin_metadata() -> dict[str, Any]:
    keys = {**Announcement.MEANING, "api_version": f"The manifest's api_version (this document: {API_VERSION})."}
    return {
        "type": "object",
        "required": list(keys),
        "properties": _strings(keys),
    }


def document(prefix: str = "tuxpilot") -> dict[str, Any]:
    """The AsyncAPI document for subject prefix `prefix`."""
    s = Subjects(prefix, _p("host"))
    names = Names.of(s)
    plugin, action = _p("plugin"), _p("action")
    exec_queue = {"nats": {"queue": plugin, "bindingVersion": "0.1.0"}}
    channels = {
        "event": _channel(s.event(f"{_p('category')}.{_p('name')}"), "Events, stored in stream "
                          f"{names.events}; a plugin receives those its manifest subscribes to through its durable "
                          f"consumer {plugin_consumer_name(plugin, _p('host'))}, and may publish only the "
                          "categories in its `emits`.", ["event"]),
        "proposal": _channel(s.proposal(plugin), f"One plugin's proposals, stored in stream {names.proposals}; "
                             "only that plugin's user may publish here.", ["proposal"]),
        "handoff": _channel(s.handoff(plugin), "One plugin's proposals handed to the host's gate by request (core "
                            "NATS: nothing stores them); only that plugin's user may publish here.", ["proposal"]),
        "handoffReply": _channel(None, "The plugin's reply inbox (<inbox_prefix>.<token>).", ["handoffAnswer"]),
        "exec": _channel(s.exec(plugin, action), "The plugin's PRIVATE execution endpoint (a NATS micro endpoint); "
                         "only the agent's user may publish here.", ["params"]),
        "execReply": _channel(None, "The requester's reply inbox (<inbox_prefix>.<token>).", ["result", "error"]),
        "act": _channel(s.act(plugin, action), "The PUBLIC action endpoint, served by the host's gate: the same "
                        "checks as a proposal, audited.", ["params"]),
        "result": _channel(s.result(plugin, action), f"The audit trail (gate only), stored in stream {names.audit}.",
                           ["result"]),
        "metrics": _channel(s.metrics(), "The monitor's snapshots.", ["metrics"]),
        "registry": _channel(f"$KV.{names.plugins}.{registry_key(_p('host'), plugin)}",
                             f"The registry bucket {names.plugins}, key <host>.<plugin>.", ["registry"]),
        "discoveryPing": _channel("$SRV.PING", "Every micro service answers.", ["discovery"]),
        "discoveryInfo": _channel(f"$SRV.INFO.{plugin}", "The instances of one plugin answer with their info.",
                                  ["discovery"]),
        "discoveryReply": _channel(None, "The asker's reply inbox.", ["info"]),
    }
    operations = {
        "receiveEvent": {
            "action": "receive",
            "channel": _ref("channels", "event"),
            "summary": "Pull events from the durable consumer: ack after the proposal is stored (or when none is "
                       "made), nak with the configured backoff when a handler fails, term what is not an event.",
        },
        "sendProposal": {
            "action": "send",
            "channel": _ref("channels", "proposal"),
            "summary": "Publish the proposal through JetStream, with Nats-Msg-Id = the proposal id.",
        },
        "handOverProposal": {
            "action": "send",
            "channel": _ref("channels", "handoff"),
            "summary": "Hand the proposal to the gate by request (when the host gives a handover timeout); ack the "
                       "event on `decided`, store the proposal on anything else or no answer.",
            "reply": {
                "channel": _ref("channels", "handoffReply"),
                "messages": [_ref("channels", "handoffReply", "messages", "handoffAnswer")],
            },
        },
        "emitEvent": {
            "action": "send",
            "channel": _ref("channels", "event"),
            "summary": "Publish an event of a category listed in the manifest's `emits`.",
        },
        "serveAction": {
            "action": "receive",
            "channel": _ref("channels", "exec"),
            "summary": "Serve one action; reply with a result document or an error document and error headers.",
            "bindings": exec_queue,
            "reply": {
                "channel": _ref("channels", "execReply"),
                "messages": [_ref("channels", "execReply", "messages", "result"),
                             _ref("channels", "execReply", "messages", "error")],
            },
        },
        "answerDiscovery": {
            "action": "receive",
            "channel": _ref("channels", "discoveryInfo"),
            "summary": "Answer $SRV.PING/INFO/STATS (the micro framework does).",
            "reply": {
                "channel": _ref("channels", "discoveryReply"),
                "messages": [_ref("channels", "discoveryReply", "messages", "info")],
            },
        },
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:tuxpilot:plugin-protocol",
        "info": {
            "title": "TuxPilot plugin protocol",
            "version": f"{API_VERSION}.0.0",
            "description": "What every TuxPilot plugin SDK implements (api_version "
            f"{API_VERSION}); generated by tuxpilot {__version__}. See docs/protocol.md.",
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {
                **{name: _schema(name) for name in schemas.SCHEMA_NAMES},
                "pluginMetadata": _plugin_metadata(),
            },
            "messages": _messages(),
            "parameters": {name: {"description": text} for name, text in PARAMETERS.items()},
        },
        "x-tuxpilot": {
            "api_version": API_VERSION,
            "durable_consumer": {"stream": names.events, "name": plugin_consumer_name(plugin, _p("host"))},
            "streams": {"events": names.events, "proposals": names.proposals, "audit": names.audit},
            "buckets": {"registry": names.plugins, "executions": names.executions, "cooldowns": names.cooldowns},
            "error_codes": dict(PLUGIN_STATUS_CODES),
            "gate_error_codes": dict(GATE_STATUS_CODES),
        },
    }
