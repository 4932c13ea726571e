"""The JSON Schemas in `schemas/`: loading them, and validating documents against them."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema_rs

from tuxpilot.protocol.errors import BadRequest, InvalidParams, PayloadTooLarge
from tuxpilot.protocol.resources import shipped

SCHEMA_NAMES = ("event", "proposal", "result", "error", "manifest", "metrics", "registry")
_MAX_REPORTED = 10
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
    _check_shape(doc, what)
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


@functools.cache
def _registry() -> jsonschema_rs.Registry:
    # Schemas refer to each other by relative $ref ("error.json"); resolve them offline.
    return jsonschema_rs.Registry([(load(n)["$id"], load(n)) for n in SCHEMA_NAMES])


class Validator:
    """A compiled schema; `check` raises InvalidParams naming every problem (up to ten)."""

    def __init__(self, schema: dict[str, Any], *, what: str = "document"):
        self.what = what
        self._validator = jsonschema_rs.validator_for(schema, registry=_registry())

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
