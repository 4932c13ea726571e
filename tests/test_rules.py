"""Rules as data: matching, why not, templated params, throttling, a broken rule next to working ones."""

from __future__ import annotations

from pathlib import Path

from tuxpilot.agent.rules import Rule, RuleSet, Throttle, event_scope, render
from tuxpilot.protocol.models import Event

PRUNE = {
    "name": "prune-var",
    "events": ["disk.low"],
    "condition": 'event.value > 95.0 && event.resource.startsWith("/var") && labels.role == "web"',
    "actions": [{"plugin": "docker", "action": "prune", "params": {"what": "images", "mount": "{{ event.resource }}",
                                                                 "pct": "{{ event.value }}",
                                                                 "note": "on {{ event.host }} at {{ event.value }}%"}}],
    "once_within": 600,
    "max_per_hour": 2,
}


def disk_low(value: float = 97.5, resource: str = "/var") -> Event:
    return Event.new("disk.low", "web-1", value=value, resource=resource, threshold=90.0, unit="%")


def test_matching_rule_proposes_templated_params() -> None:
    rules = RuleSet.load([PRUNE])
    [verdict] = rules.evaluate(disk_low(), event_scope(disk_low(), {"role": "web"}, {}))
    assert verdict.matched, verdict.why
    [action] = verdict.actions
    assert (action.plugin, action.action) == ("docker", "prune")
    # a whole-string placeholder keeps the value's type; inside text it becomes text
    assert action.params == {"what": "images", "mount": "/var", "pct": 97.5, "note": "on web-1 at 97.5%"}


def test_not_matching_says_why() -> None:
    rules = RuleSet.load([PRUNE])
    low = disk_low(value=50.0)
    assert "condition is False" in rules.evaluate(low, event_scope(low, {"role": "web"}, {}))[0].why
    db = disk_low()
    assert not rules.evaluate(db, event_scope(db, {"role": "db"}, {}))[0].matched
    other = Event.new("memory.high", "web-1", value=99.0)
    assert "not one of disk.low" in rules.evaluate(other, event_scope(other, {}, {}))[0].why
    # a label the host lacks is an evaluation error, reported, never raised
    verdict = rules.evaluate(db, event_scope(db, {}, {}))[0]
    assert not verdict.matched and "could not be evaluated" in verdict.why


def test_condition_reads_metrics_and_data() -> None:
    rule = {**PRUNE, "name": "busy", "events": ["disk.*"],
            "condition": 'metrics.cpu_percent < 50.0 && event.data.fstype == "ext4"'}
    rules = RuleSet.load([rule])
    ev = Event.new("disk.low", "h", value=1.0, data={"fstype": "ext4"})
    assert rules.evaluate(ev, event_scope(ev, {}, {"cpu_percent": 10.0}))[0].matched
    assert not rules.evaluate(ev, event_scope(ev, {}, {"cpu_percent": 90.0}))[0].matched


def test_template_is_values_only() -> None:
    # an event whose data looks like a template or code stays data
    scope = {"event": {"resource": "{{ labels.secret }}; rm -rf /", "data": {}}, "labels": {"secret": "x"}}
    assert render({"m": "{{ event.resource }}"}, scope) == {"m": "{{ labels.secret }}; rm -rf /"}
    assert render({"m": "a {{ event.resource }}"}, scope) == {"m": "a {{ labels.secret }}; rm -rf /"}


def test_broken_rule_refused_with_position_others_work(tmp_path: Path) -> None:
    broken = {**PRUNE, "name": "broken", "condition": "event.value > "}
    bad_root = {**PRUNE, "name": "bad-root", "actions": [{"plugin": "docker", "action": "prune",
                                                          "params": {"x": "{{ os.environ }}"}}]}
    file = tmp_path / "rules.toml"
    file.write_text('[[rules]]\nname = "from-file"\nevents = ["cpu.high"]\ncondition = "true"\n'
                    '[[rules.actions]]\nplugin = "sysmon"\naction = "report"\n')
    rules = RuleSet.load([broken, PRUNE, bad_root, {**PRUNE}], file)
    assert set(rules.rules) == {"prune-var", "from-file"}
    assert "line 1, column 15" in rules.refused["broken"]
    assert "must start with one of" in rules.refused["bad-root"]
    assert "defined twice" in rules.refused["prune-var (duplicate)"]
    ev = disk_low()
    assert [v.matched for v in rules.evaluate(ev, event_scope(ev, {"role": "web"}, {}))] == [True, False]


def test_throttle_once_within_and_max_per_hour() -> None:
    rule = Rule.model_validate(PRUNE)
    throttle = Throttle()
    assert throttle.admit(rule, at=0.0) is None
    assert "once_within" in (throttle.admit(rule, at=10.0) or "")
    assert throttle.admit(rule, at=601.0) is None
    assert "max_per_hour is 2" in (throttle.admit(rule, at=1300.0) or "")
    assert throttle.admit(rule, at=3601.0) is None  # the first firing left the hour
