"""The JSON Schemas in `schemas/`: loading them, and validating documents against them."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema_rs

from agent.errors import InvalidParams
from agent.resources import shipped

SCHEMA_NAMES = ("event", "proposal", "result", "error", "manifest", "metrics")
_MAX_REPORTED = 10


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
        return bool(self._validator.is_valid(doc))

    def errors(self, doc: Any) -> list[dict[str, str]]:
        found = []
        for err in self._validator.iter_errors(doc):
            path = "/" + "/".join(str(p) for p in err.instance_path)
            found.append({"path": path, "message": err.message[:300]})
            if len(found) >= _MAX_REPORTED:
                break
        return found

    def check(self, doc: Any) -> None:
        if self._validator.is_valid(doc):
            return
        problems = self.errors(doc)
        first = problems[0]
        raise InvalidParams(
            f"{self.what} is invalid at {first['path']}: {first['message']}",
            details={"errors": problems},
        )


@functools.cache
def validator(name: str) -> Validator:
    """The compiled validator of a shipped schema."""
    return Validator(load(name), what=name)
