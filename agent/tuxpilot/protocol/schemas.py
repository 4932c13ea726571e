"""The JSON Schemas in `schemas/`: loading them, and validating documents against them."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs

from tuxpilot.protocol.errors import BadRequest, InvalidParams, InvalidSchema, PayloadTooLarge
from tuxpilot.protocol.resources import shipped

SCHEMA_NAMES = ("event", "proposal", "result", "error", "manifest", "metrics", "registry", "package-statement",
                "package-entry")
_MAX_REPORTED = 10
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Deeper documents are refused before validation: no contract here nests anywhere near this.
MAX_DEPTH = 64


def parse(raw: bytes, *, what: str, limit: int) -> Any:
    """Bytes from the wire to a JSON document, or BadRequest/PayloadTooLarge saying what is wrong.

    Stricter than json.loads: the bytes must be UTF-8, strings (keys too) may not hold lone
    surrogates (`"\\ud800"` parses, but can be neither validated nor sent on), and nesting is
    capped at MAX_DEPTH, so nothing downstream meets a document it cannot handle.
    """
    if len(raw) > limit:
        raise PayloadTooLarge(f"{what} is {len(raw)} bytes; the limit is {limit}")
    try:
        doc = json.loads(raw.decode("utf-8-sig"))  # a leading BOM is allowed, as json.loads allows it
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if _may_be_misshapen(raw):
        _check_shape(doc, what)
    return doc


def _may_be_misshapen(raw: bytes) -> bool:
    """Whether the document needs `_check_shape`'s walk, told from its bytes (a walk costs ~20 µs on a
    proposal, as much as parsing it; the gate parses one per action).

    It cannot nest deeper than its brackets, and valid UTF-8 holds no surrogate: one can only come
    from a `\\uD800`-`\\uDFFF` escape. Either sign (or a bracket or `\\u` inside a string) means a walk.
    """
    return raw.count(b"[") + raw.count(b"{") >= MAX_DEPTH or _SURROGATE_ESCAPE.search(raw) is not None


def parse_params(raw: bytes, limit: int) -> dict[str, Any]:
    """A request body as action params: empty means no params; anything else must be a JSON object."""
    if not raw.strip():
        return {}
    doc = parse(raw, what="params", limit=limit)
    if not isinstance(doc, dict):
        raise BadRequest(f"params must be a JSON object, not {type(doc).__name__}")
    return doc


def _check_shape(doc: Any, what: str) -> None:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"{what} nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, str):
            _check_text(node, what)
        elif isinstance(node, dict):
            for key, value in node.items():
                _check_text(key, what)
                stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} holds a string that is not valid Unicode (a lone surrogate)") from None


def schema_dir() -> Path:
    return shipped("schemas")


@functools.cache
def load(name: str) -> dict[str, Any]:
    """The schema document `name` (one of SCHEMA_NAMES)."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    doc: dict[str, Any] = json.loads((schema_dir() / f"{name}.json").read_text())
    return doc


def _no_retrieval(uri: str) -> Any:
    """The retriever of every validator: a `$ref` outside the document and the shipped schemas is refused.

    Left to itself the validator reads `file://` and fetches `http://` references while compiling: a
    plugin's params schema pointing at the agent's credential file would copy it into the audit, and one
    pointing at a listener that never answers would stall the agent's event loop.
    """
    raise ValueError(f"$ref {uri[:200]!r} leaves the document; TuxPilot resolves no file or network reference")


@functools.cache
def _registry() -> jsonschema_rs.Registry:
    # Schemas refer to each other by relative $ref ("error.json"); resolve them offline.
    return jsonschema_rs.Registry([(load(n)["$id"], load(n)) for n in SCHEMA_NAMES], retriever=_no_retrieval)


class Validator:
    """A compiled schema; `check` raises InvalidParams naming every problem (up to ten).

    Compiling never reads a file or the network (see `_no_retrieval`): a schema whose `$ref` leaves
    the document is refused with InvalidSchema.
    """

    def __init__(self, schema: dict[str, Any], *, what: str = "document"):
        self.what = what
        try:
            self._validator = jsonschema_rs.validator_for(schema, registry=_registry(), retriever=_no_retrieval)
        except (ValueError, jsonschema_rs.ValidationError) as exc:
            # The message names the reference, never what it points at: nothing was read.
            raise InvalidSchema(f"schema of {what} cannot be used: {str(exc).splitlines()[0][:300]}") from None

    def is_valid(self, doc: Any) -> bool:
        try:
            return bool(self._validator.is_valid(doc))
        except ValueError:  # a document the validator cannot read at all is not valid
            return False

    def errors(self, doc: Any) -> list[dict[str, str]]:
        found = []
        for err in self._validator.iter_errors(doc):
            path = "/" + "/".join(str(p) for p in err.instance_path)
            found.append({"path": path, "message": err.message[:300]})
            if len(found) >= _MAX_REPORTED:
                break
        return found

    def check(self, doc: Any) -> None:
        if self.is_valid(doc):
            return
        try:
            problems = self.errors(doc)
        except ValueError as exc:
            problems = [{"path": "/", "message": f"unreadable: {str(exc)[:200]}"}]
        if not problems:
            problems = [{"path": "/", "message": "not valid"}]
        first = problems[0]
        raise InvalidParams(
            f"{self.what} is invalid at {first['path']}: {first['message']}",
            details={"errors": problems},
        )


@functools.cache
def validator(name: str) -> Validator:
    """The compiled validator of a shipped schema."""
    return Validator(load(name), what=name)
