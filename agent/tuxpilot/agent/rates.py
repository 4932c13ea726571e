"""Per-plugin proposal rate limits: host policy, so that one plugin cannot flood the gate or the audit.

Each plugin gets at most `limit` proposals per window of `window_s` seconds. Proposals beyond it are
not decided and not recorded one by one: each window that dropped any becomes ONE summary record
(how many, the first and last proposal ids). Pure bookkeeping over a clock; the gate does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Window:
    plugin: str
    start: float
    window_s: float
    limit: int
    admitted: int = 0
    dropped: int = 0
    first_dropped: str | None = None
    last_dropped: str | None = None


@dataclass
class ProposalRates:
    windows: dict[str, Window] = field(default_factory=dict)
    # Windows that ended having dropped proposals, waiting to be summarised.
    ended: list[Window] = field(default_factory=list)

    def admit(self, plugin: str, proposal: str, at: float, limit: int, window_s: float) -> bool:
        """Count one proposal of `plugin`; False when it is over the limit (it is counted as dropped)."""
        if limit <= 0:
            return True
        window = self.windows.get(plugin)
        if window is None or at - window.start >= window.window_s:
            if window is not None and window.dropped:
                self.ended.append(window)
            window = self.windows[plugin] = Window(plugin, at, window_s, limit)
        if window.admitted < window.limit:
            window.admitted += 1
            return True
        window.dropped += 1
        window.first_dropped = window.first_dropped or proposal
        window.last_dropped = proposal
        return False

    def due(self, at: float) -> list[Window]:
        """The windows that dropped proposals and are over: each is summarised once."""
        for plugin, window in list(self.windows.items()):
            if window.dropped and at - window.start >= window.window_s:
                self.ended.append(window)
                del self.windows[plugin]
        ended, self.ended = self.ended, []
        return ended

    def flush(self) -> list[Window]:
        """Every window that dropped proposals, over or not (the gate is stopping)."""
        ended = self.ended + [w for w in self.windows.values() if w.dropped]
        self.ended, self.windows = [], {}
        return ended
