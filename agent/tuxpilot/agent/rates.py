"""Per-plugin proposal rate limits: host policy, so that one plugin cannot flood the gate or the audit.

Each plugin gets at most `limit` proposals per window of `window_s` seconds, counted by the time the
server stored each proposal (windows aligned on multiples of `window_s`), so the limit is about how
fast a plugin publishes, however far behind the gate is. Proposals beyond it are not decided and not
recorded one by one: a window that dropped any becomes ONE summary record (how many, the first and
last proposal ids), written a window after it is over. Pure bookkeeping over a clock; the gate does the I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Window:
    plugin: str
    start: float
    window_s: float
    limit: int
    admitted: int = 0
    dropped: int = 0  # since the last summary of this window
    first_dropped: str | None = None
    last_dropped: str | None = None
    summaries: int = 0  # more than one only when a gate far behind still finds drops of a summarised window

    def summary(self) -> Window:
        """What to record now; the window keeps counting what it admitted, and starts over on drops."""
        done = Window(self.plugin, self.start, self.window_s, self.limit, self.admitted, self.dropped,
                      self.first_dropped, self.last_dropped, self.summaries)
        self.dropped, self.first_dropped, self.last_dropped = 0, None, None
        self.summaries += 1
        return done


@dataclass
class ProposalRates:
    windows: dict[str, Window] = field(default_factory=dict)
    # Windows over and replaced, with drops not yet summarised.
    ended: list[Window] = field(default_factory=list)

    def admit(self, plugin: str, proposal: str, at: float, limit: int, window_s: float) -> bool:
        """Count one proposal of `plugin` stored at `at`; False when it is over the limit (counted as dropped)."""
        if limit <= 0:
            return True
        start = math.floor(at / window_s) * window_s
        window = self.windows.get(plugin)
        if window is None or start > window.start:
            if window is not None and window.dropped:
                self.ended.append(window.summary())
            window = self.windows[plugin] = Window(plugin, start, window_s, limit)
        elif start < window.start:  # stored before the window in force (clock or redelivery): let it be
            return True
        if window.admitted < window.limit:
            window.admitted += 1
            return True
        window.dropped += 1
        window.first_dropped = window.first_dropped or proposal
        window.last_dropped = proposal
        return False

    def due(self, now: float) -> list[Window]:
        """Summaries to record: windows replaced by a later one, and windows with drops over for a window's
        length by `now`."""
        ended, self.ended = self.ended, []
        for window in self.windows.values():
            # One window's grace after it ends: a gate behind the stream is still finding its proposals.
            if window.dropped and now >= window.start + 2 * window.window_s:
                ended.append(window.summary())
        return ended

    def flush(self) -> list[Window]:
        """Every window with drops not yet summarised, over or not (the gate is stopping)."""
        ended = self.ended + [w.summary() for w in self.windows.values() if w.dropped]
        self.ended, self.windows = [], {}
        return ended
