"""Which hosts a fleet-wide call is for: host globs and labels, read from the request's headers."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from tuxpilot.protocol.errors import BadRequest
from tuxpilot.protocol.names import FLEET_HOSTS_HEADER, FLEET_LABELS_HEADER


@dataclass(frozen=True)
class Targets:
    """Host globs (any may match; none: every host) and labels (all must hold)."""

    hosts: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    def match(self, host: str, labels: dict[str, str]) -> bool:
        if self.hosts and not any(fnmatch.fnmatchcase(host, glob) for glob in self.hosts):
            return False
        return all(labels.get(key) == value for key, value in self.labels.items())

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.hosts:
            out[FLEET_HOSTS_HEADER] = ",".join(self.hosts)
        if self.labels:
            out[FLEET_LABELS_HEADER] = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return out

    @classmethod
    def parse(cls, hosts: str | None, labels: str | None) -> Targets:
        globs = tuple(g.strip() for g in (hosts or "").split(",") if g.strip())
        pairs: dict[str, str] = {}
        for item in (labels or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.strip().partition("=")
            if not sep or not key:
                raise BadRequest(f"label {item.strip()!r}: expected key=value")
            pairs[key] = value
        return cls(globs, pairs)

    @classmethod
    def of_headers(cls, headers: dict[str, str] | None) -> Targets:
        headers = headers or {}
        return cls.parse(headers.get(FLEET_HOSTS_HEADER), headers.get(FLEET_LABELS_HEADER))
