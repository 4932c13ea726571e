"""Declarative rules: when an event of a listed type meets a CEL condition, propose actions.

A rule is data (`Rule`, from `[[rules]]` in the host config or a rules file); `RuleSet.load` compiles
each condition once and refuses a rule whose expression does not compile, naming the line and column,
while the others keep working. `RuleSet.evaluate` says for every rule whether an event matches and why
not; `Throttle` paces the rules that fire. Params are rendered from `{{ path }}` placeholders by value
substitution only (no code is run), so an event cannot inject anything but data into an action.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.models import Event

# What a condition and a template may read; nothing else is bound.
ROOTS = ("event", "labels", "metrics")
Name = Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")]
EventPattern = Annotated[str, Field(pattern=r"^([a-z0-9_-]{1,64}|\*)\.([a-z0-9_-]{1,64}|\*)$")]
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*\}\}")


class RuleAction(BaseModel):
    """One action a rule asks for; string params may hold `{{ event.resource }}` placeholders."""

    model_config = ConfigDict(extra="forbid")
    plugin: Name
    action: Name
    params: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None


class Rule(BaseModel):
    """`[[rules]]`: name, event types (`disk.low`, `disk.*`), a CEL condition, actions, throttling."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    events: list[EventPattern] = Field(min_length=1)
    condition: str = Field("true", description="CEL over `event`, `labels` and `metrics`; true fires the rule.")
    actions: list[RuleAction] = Field(min_length=1)
    once_within: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Seconds after a firing during which the rule does not fire again (0: no pause)."
    )
    max_per_hour: Annotated[int, Field(ge=0)] = Field(0, description="Firings per rolling hour (0: no limit).")
    enabled: bool = True


@dataclass(frozen=True)
class Proposed:
    """An action a rule would propose, its params rendered from the event."""

    plugin: str
    action: str
    params: dict[str, Any]
    reason: str


@dataclass
class Verdict:
    """What one rule makes of one event: matched (with the actions it proposes) or why not."""

    rule: str
    matched: bool
    why: str
    actions: list[Proposed] = field(default_factory=list)


class TemplateError(ValueError):
    pass


def lookup(scope: Mapping[str, Any], path: str) -> Any:
    """A dotted path's value in the scope: keys only, no calls, no indexing expressions."""
    value: Any = scope
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise TemplateError(f"{{{{ {path} }}}}: no {part!r} here")
        value = value[part]
    return value


def render(value: Any, scope: Mapping[str, Any]) -> Any:
    """Params with placeholders replaced by values. A string that is one placeholder takes the value's
    own type (a number stays a number); a placeholder inside text is replaced by the value as text."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value.strip())
        if whole:
            return lookup(scope, whole.group(1))
        return _PLACEHOLDER.sub(lambda m: _text(lookup(scope, m.group(1))), value)
    if isinstance(value, dict):
        return {k: render(v, scope) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, scope) for v in value]
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    import json

    return json.dumps(value, sort_keys=True)


def placeholders(value: Any) -> list[str]:
    if isinstance(value, str):
        return _PLACEHOLDER.findall(value)
    if isinstance(value, dict):
        return [p for v in value.values() for p in placeholders(v)]
    if isinstance(value, list):
        return [p for v in value for p in placeholders(v)]
    return []


def event_scope(event: Event, labels: Mapping[str, str], metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a condition reads: every event field (absent ones null), the host's labels, the last metrics."""
    return {"event": event.model_dump(mode="json"), "labels": dict(labels), "metrics": dict(metrics or {})}


def matches_type(patterns: Iterable[str], event_type: str) -> bool:
    category, _, name = event_type.partition(".")
    for pattern in patterns:
        pc, _, pn = pattern.partition(".")
        if pc in ("*", category) and pn in ("*", name):
            return True
    return False


class Compiled:
    """A rule with its condition compiled once."""

    def __init__(self, rule: Rule):
        import cel  # imported on first use: the agent without rules does not pay for it

        self.rule = rule
        try:
            self.program = cel.compile(rule.condition)
        except ValueError as exc:
            raise ConfigError(f"rule {rule.name!r}: condition does not compile: {_position(str(exc))}") from None
        for path in (p for a in rule.actions for p in placeholders(a.params)):
            if path.split(".", 1)[0] not in ROOTS:
                raise ConfigError(f"rule {rule.name!r}: placeholder {{{{ {path} }}}} must start with one of "
                                  f"{', '.join(ROOTS)}")

    def evaluate(self, event: Event, scope: Mapping[str, Any]) -> Verdict:
        name = self.rule.name
        if not self.rule.enabled:
            return Verdict(name, False, "disabled")
        if not matches_type(self.rule.events, event.type):
            return Verdict(name, False, f"event type {event.type} is not one of {', '.join(self.rule.events)}")
        try:
            value = self.program.execute(dict(scope))
        except Exception as exc:  # the bindings raise KeyError/TypeError/RuntimeError for data they cannot use
            return Verdict(name, False, f"condition could not be evaluated: {type(exc).__name__}: {exc}"[:500])
        if value is not True:
            return Verdict(name, False, f"condition is {value!r}: {self.rule.condition}"[:500])
        try:
            actions = [
                Proposed(a.plugin, a.action, render(a.params, scope), a.reason or f"rule {name} on {event.type}")
                for a in self.rule.actions
            ]
        except TemplateError as exc:
            return Verdict(name, False, f"params could not be rendered: {exc}")
        return Verdict(name, True, "condition is true", actions)


def _position(message: str) -> str:
    """The bindings say `ERROR: <input>:LINE:COL: what` plus the source and a caret; keep those lines."""
    found = re.search(r"<input>:(\d+):(\d+): (.*)", message)
    if not found:
        return message.splitlines()[0][:300] if message else "syntax error"
    line, col, what = found.groups()
    tail = "\n".join(ln for ln in message.splitlines()[1:] if ln.startswith("|"))
    return f"line {line}, column {col}: {what[:200]}" + (f"\n{tail}" if tail else "")


@dataclass
class RuleSet:
    """The rules in force and the ones refused at load, each with its reason."""

    rules: dict[str, Compiled] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, rules: Iterable[Rule | Mapping[str, Any]], rules_file: Path | None = None) -> RuleSet:
        entries: list[Rule | Mapping[str, Any]] = list(rules)
        out = cls()
        if rules_file is not None:
            try:
                entries += tomllib.loads(rules_file.read_text()).get("rules", [])
            except (OSError, tomllib.TOMLDecodeError) as exc:
                out.refused[str(rules_file)] = f"rules file unreadable: {exc}"
        for i, entry in enumerate(entries):
            label = str(entry.get("name", f"#{i}")) if isinstance(entry, Mapping) else entry.name
            try:
                rule = entry if isinstance(entry, Rule) else Rule.model_validate(entry)
                if rule.name in out.rules:
                    raise ConfigError(f"rule {rule.name!r} is defined twice; the first one is kept")
                out.rules[rule.name] = Compiled(rule)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                out.refused[label] = f"rule {label!r}: {where}: {err['msg']}"
            except ConfigError as exc:
                out.refused[label if label not in out.rules else f"{label} (duplicate)"] = exc.message
        return out

    def evaluate(self, event: Event, scope: Mapping[str, Any]) -> list[Verdict]:
        return [compiled.evaluate(event, scope) for compiled in self.rules.values()]


@dataclass
class Throttle:
    """When each rule fired: `once_within` and `max_per_hour`, on a clock the caller gives."""

    last: dict[str, float] = field(default_factory=dict)
    hour: dict[str, deque[float]] = field(default_factory=dict)

    def admit(self, rule: Rule, at: float | None = None) -> str | None:
        """Count a firing and return None, or return why the rule may not fire now."""
        at = time.monotonic() if at is None else at
        previous = self.last.get(rule.name)
        if rule.once_within and previous is not None and at - previous < rule.once_within:
            return f"fired {at - previous:.0f} s ago; once_within is {rule.once_within:g} s"
        window = self.hour.setdefault(rule.name, deque())
        while window and at - window[0] >= 3600:
            window.popleft()
        if rule.max_per_hour and len(window) >= rule.max_per_hour:
            return f"fired {len(window)} times in the last hour; max_per_hour is {rule.max_per_hour}"
        window.append(at)
        self.last[rule.name] = at
        return None
