"""The agent's configuration: one pydantic model tree, read from a TOML file and `TUXPILOT_*` environment
variables. The sections every process shares are in `tuxpilot.settings`, the plugin host's in
`tuxpilot.runtimes.settings`; this module adds the agent's own (monitor, gate, embedded server).

Every key has an environment name derived from its path: `nats.url` is `TUXPILOT_NATS_URL`,
`monitor.memory.threshold` is `TUXPILOT_MONITOR_MEMORY_THRESHOLD`. Defaults live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, model_validator

from tuxpilot.agent.approvals import ApprovalPolicy
from tuxpilot.pdk.settings import MarketplaceConfig
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.manifest import FleetLimit, Manifest, Permission
from tuxpilot.runtimes.settings import HostSettings
from tuxpilot.settings import EmbeddedConfig, Seconds, Section, load_settings

# A handed-over proposal's wait: the slowest action's timeout and this, at most this share of ack_wait.
HANDOFF_MARGIN_S = 5.0
HANDOFF_SHARE_OF_ACK_WAIT = 0.8


class CheckConfig(Section):
    enabled: bool = True
    threshold: float
    clear: float
    sustain_s: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _clear_below_threshold(self) -> Self:
        if self.clear > self.threshold:
            raise ValueError(f"clear ({self.clear}) must not be above threshold ({self.threshold})")
        return self


class MonitorConfig(Section):
    enabled: bool = True
    interval_s: Seconds = 10.0
    metrics_interval_s: Seconds = 60.0
    event_ttl_s: Seconds = 300.0
    buffer_events: Annotated[int, Field(ge=1)] = Field(
        10_000, description="Events kept while the server is unreachable; beyond it the oldest are dropped."
    )
    memory: CheckConfig = CheckConfig(threshold=90.0, clear=85.0, sustain_s=30.0)
    swap: CheckConfig = CheckConfig(threshold=80.0, clear=70.0, sustain_s=60.0)
    disk: CheckConfig = CheckConfig(threshold=90.0, clear=85.0, sustain_s=0.0)
    cpu: CheckConfig = CheckConfig(threshold=90.0, clear=80.0, sustain_s=60.0)
    load: CheckConfig = Field(
        CheckConfig(threshold=2.0, clear=1.5, sustain_s=60.0),
        description="1-minute load average per CPU core.",
    )
    ignore_fstypes: list[str] = ["squashfs", "tmpfs", "devtmpfs", "overlay", "iso9660", "nsfs", "ramfs"]


class GateConfig(Section):
    dry_run: bool = Field(False, description="Record dry_run instead of executing any action.")
    action_timeout_s: Seconds = 10.0
    unavailable_retry_s: Annotated[float, Field(ge=0)] = Field(
        2.0, description="How long to keep asking when no plugin instance serves the action (a restart)."
    )
    cooldown_s: Annotated[float, Field(ge=0)] = Field(
        60.0, description="Default pause between two runs of one action on one resource."
    )
    cooldowns: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description='Per action, keyed "plugin.action".'
    )
    dry_run_actions: list[str] = Field(default_factory=list, description='Actions ("plugin.action") only dry-run.')
    max_payload: Annotated[int, Field(ge=1024)] = Field(256 * 1024, description="Largest proposal accepted, bytes.")
    max_concurrency: Annotated[int, Field(ge=1)] = Field(256, description="Proposals decided at once.")
    handoff: bool = Field(
        True, description="Plugins hand their proposals to the gate by request, and store one only when the gate "
        "does not answer in time (false: every proposal is stored in the proposals stream first)."
    )
    max_in_flight_per_plugin: Annotated[int, Field(ge=1)] = Field(
        32, description="Actions executing at once per plugin; beyond it proposals wait (back-pressure)."
    )
    operator_cooldowns: bool = Field(
        False, description="Apply cooldowns to operator calls on the public action endpoint too (proposals always)."
    )
    proposal_rate: Annotated[int, Field(ge=0)] = Field(
        600, description="Proposals each plugin may make per proposal_rate_window_s; more are dropped (0: no limit)."
    )
    proposal_rate_window_s: Annotated[float, Field(gt=0)] = 60.0
    proposal_rates: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="proposal_rate per plugin, keyed by plugin name."
    )
    record_params_max_bytes: Annotated[int, Field(ge=0)] = Field(
        4096, description="Params larger than this (as JSON) are recorded as their size and sha256, not copied."
    )
    late_reply_window_s: Annotated[float, Field(ge=0)] = Field(
        300.0, description="How long a timed-out action's late reply is still recorded as a follow-up outcome."
    )
    fleet_limits: dict[str, FleetLimit] = Field(
        default_factory=dict,
        description='Fleet concurrency limits, keyed "plugin.action"; over the manifest\'s `fleet_limit`.',
    )


class FleetConfig(Section):
    enrollment: Path | None = Field(
        None, description="This host's enrolment file (`tuxpilot fleet join` sets it): its users are minted from it."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="What fleet-wide calls target by label.")
    heartbeat_s: Annotated[float, Field(gt=0)] = Field(
        5.0, description="Seconds between heartbeats; a host is lost after three missed."
    )


class InstallConfig(Section):
    """How the agent installs and updates plugins from packages."""

    health_timeout_s: Annotated[float, Field(gt=0)] = Field(
        30.0, description="A new or updated plugin must answer its health check within this; else it is undone "
        "(install) or rolled back (update).",
    )


class Config(HostSettings):
    """The agent's whole configuration: the shared node settings, the plugin host's, and its own sections."""

    embedded: EmbeddedConfig = EmbeddedConfig()
    monitor: MonitorConfig = MonitorConfig()
    gate: GateConfig = GateConfig()
    fleet: FleetConfig = FleetConfig()
    install: InstallConfig = InstallConfig()
    plugin_dirs: list[Path] = Field(default_factory=list, description="Folders searched for plugins.")
    run_plugins: list[str] = Field(["sysmon"], description="Local plugins `tuxpilot up` starts and supervises.")
    labels: dict[str, str] = Field(
        default_factory=dict, description='This host\'s labels (role = "web") for rules, over [fleet] labels.'
    )
    # Rules and schedules are checked one by one when loaded (agent/rules.py, agent/schedules.py): a broken
    # one is refused with its error and the others work, so the whole config is not refused for it.
    rules: list[dict[str, Any]] = Field(default_factory=list, description="[[rules]]: see the README's Rules.")
    rules_file: Path | None = Field(None, description="A TOML file of more [[rules]], reloaded when it changes.")
    schedules: list[dict[str, Any]] = Field(default_factory=list, description="[[schedules]]: see Schedules.")
    approvals: ApprovalPolicy = ApprovalPolicy()
    marketplace: MarketplaceConfig = MarketplaceConfig()


def edit_grants(path: Path, manifest: Manifest, current: frozenset[Permission], *, add: list[Permission],
                remove: list[Permission]) -> list[Permission]:
    """Write `[plugins.<name>] permissions` into the TOML file at `path`, keeping its comments and layout.

    Only permissions the manifest asks for can be granted. Returns the new grant list.
    """
    import tomlkit

    unknown = [p.value for p in add if p not in manifest.permissions]
    if unknown:
        raise ConfigError(f"{manifest.name} does not ask for {', '.join(unknown)} (its manifest: "
                          f"{', '.join(p.value for p in manifest.permissions) or 'nothing'})")
    granted = sorted((set(current) | set(add)) - set(remove), key=lambda p: p.value)
    doc = tomlkit.parse(path.read_text()) if path.is_file() else tomlkit.document()
    plugins = doc.setdefault("plugins", tomlkit.table(is_super_table=True))
    section = plugins.setdefault(manifest.name, tomlkit.table())
    section["permissions"] = [p.value for p in granted]
    write_private(path, tomlkit.dumps(doc))
    return granted


def forget_grants(path: Path, name: str) -> bool:
    """Take `[plugins.<name>] permissions` out of the TOML file at `path` (a plugin removed from the host: a
    later plugin of the same name must not inherit what the operator granted this one). Whether it changed."""
    import tomlkit

    if not path.is_file():
        return False
    doc = tomlkit.parse(path.read_text())
    section = doc.get("plugins", {}).get(name)
    if section is None or "permissions" not in section:
        return False
    del section["permissions"]
    if not section:
        del doc["plugins"][name]
    write_private(path, tomlkit.dumps(doc))
    return True


def write_private(path: Path, text: str) -> None:
    """Write the host config, which may hold the agent's credentials: a new file is 0600, an existing one
    keeps its mode without the bits for others (0644 becomes 0640). Replaced in one rename, so the file
    is never briefly open to others nor half-written."""
    path = Path(os.path.realpath(path))  # a symlinked config is edited where it lives
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.stat()
        mode, owner = stat.S_IMODE(st.st_mode) & ~0o007, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o600, None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """The configuration from `path` (or TUXPILOT_CONFIG) and the environment; ConfigError names the bad key."""
    return load_settings(Config, path, environ)


def handoff_timeout_s(config: Config, manifest: Manifest) -> float:
    """How long a plugin waits for the gate to decide a proposal it hands over by request: its slowest
    action's timeout and a margin for the steps and the record, but well inside its events' `ack_wait`
    (an event redelivered meanwhile would be proposed again). 0: it stores every proposal instead."""
    if not config.gate.handoff:
        return 0.0
    slowest = max((spec.timeout_s or config.gate.action_timeout_s for spec in manifest.actions.values()),
                  default=config.gate.action_timeout_s)
    return min(slowest + HANDOFF_MARGIN_S, config.streams.ack_wait_s * HANDOFF_SHARE_OF_ACK_WAIT)
