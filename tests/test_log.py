"""The console lines a service writes: the same text as structlog's own console renderer, cheaper."""

from __future__ import annotations

from typing import Any

import pytest
from structlog import dev
from tuxpilot.log import plain_console

LINES: list[dict[str, Any]] = [
    {"event": "gate.decided", "timestamp": "2026-11-25T22:00:00.000000Z", "level": "info", "source": "proposal",
     "caller": None, "ms": 1.234, "plugin": "noop", "reason": "a b", "ids": [1, "x"], "logger": "tuxpilot.gate"},
    {"event": "gate.failed", "timestamp": "T", "level": "error", "exception": "Traceback (most recent call last):\n…"},
    {"event": "plugin.stopped", "timestamp": "T", "level": "info"},
    {"event": "an.event.name.longer.than.its.column", "timestamp": "T", "level": "warning", "k": "it's",
     "empty": "", "doc": {"a": 1}, "quoted": 'say "hi"', "tab": "a\tb", "eq": "a=b", "unicode": "é"},
    {"event": "x", "level": "debug", "timestamp": "T", "stack": "Stack (most recent call last):\n  f"},
    {"event": "no.time.nor.level", "n": 1},
    {"event": "named", "timestamp": "T", "level": "info", "logger_name": "tuxpilot.gate", "a": 1},
    {"timestamp": "T", "level": "info", "a": 1},
    {"event": "raw", "timestamp": "T", "level": "info", "b": b"\x00", "none": None, "f": 1.5, "t": (1, 2)},
    {"event": "caught", "timestamp": "T", "level": "error", "exc_info": (ValueError, ValueError("x"), None)},
]


@pytest.mark.parametrize("line", LINES, ids=[str(line.get("event", "no-event")) for line in LINES])
def test_plain_console_prints_what_structlogs_console_renderer_prints(line: dict[str, Any]) -> None:
    theirs = dev.ConsoleRenderer(colors=False, exception_formatter=dev.plain_traceback)
    assert plain_console(None, "info", dict(line)) == theirs(None, "info", dict(line))
