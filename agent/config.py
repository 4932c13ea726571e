"""Configuration: one pydantic model tree, read from a TOML file and `TUXPILOT_*` environment variables.

Every key has an environment name derived from its path: `nats.url` is `TUXPILOT_NATS_URL`,
`monitor.memory.threshold` is `TUXPILOT_MONITOR_MEMORY_THRESHOLD`. Defaults live here and nowhere else.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from agent.errors import ConfigError
from agent.manifest import DANGEROUS, Limits, Manifest, Permission

ENV_PREFIX = "TUXPILOT_"
SYSTEM_CONFIG = Path("/etc/tuxpilot/tuxpilot.toml")
_TOKEN = re.compile(r"[^a-z0-9_-]+")


def subject_token(text: str) -> str:
    """`text` made a valid single subject token: lower-case `[a-z0-9_-]`, at most 64 characters."""
    token = _TOKEN.sub("-", text.strip().lower()).strip("-")[:64]
    return token or "localhost"


def default_host_id() -> str:
    return subject_token(socket.gethostname().split(".", 1)[0])


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/tuxpilot")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tuxpilot"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Seconds = Annotated[float, Field(gt=0)]


class NatsConfig(Section):
    url: str | None = Field(None, description="Server URL(s), comma-separated; unset: start an embedded server.")
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: Path | None = Field(None, description="A .creds file (JWT + nkey seed).")
    user_file: Path | None = Field(None, description="A TuxPilot credential file (user, password) as `auth` writes.")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: Seconds = 2.0
    reconnect_wait_s: Seconds = 1.0
    max_reconnect_attempts: int = Field(-1, description="-1: forever.")
    request_timeout_s: Seconds = 5.0
    pending_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in (self.url or "").split(",") if u.strip()]


class EmbeddedConfig(Section):
    auth: bool = Field(True, description="Run the embedded server with the generated per-plugin authorization.")
    host: str = "127.0.0.1"
    port: int = Field(-1, ge=-1, le=65535, description="-1: any free port.")
    sync_interval: str = Field("1s", description="JetStream fsync interval; 'always' for every write.")
    ready_timeout_s: Seconds = 10.0


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
    max_in_flight_per_plugin: Annotated[int, Field(ge=1)] = Field(
        32, description="Actions executing at once per plugin; beyond it proposals wait (back-pressure)."
    )


class StreamsConfig(Section):
    """JetStream streams the agent creates (idempotently) for events, proposals and the audit trail."""

    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    duplicate_window_s: Seconds = 120.0
    events_max_age_s: Seconds = 24 * 3600.0
    events_max_bytes: int = 256 * 1024 * 1024
    proposals_max_age_s: Seconds = 24 * 3600.0
    proposals_max_bytes: int = 256 * 1024 * 1024
    audit_max_age_s: Seconds = 30 * 24 * 3600.0
    audit_max_bytes: int = 1024 * 1024 * 1024
    max_deliver: Annotated[int, Field(ge=1)] = Field(5, description="Deliveries of one event to a plugin.")
    ack_wait_s: Seconds = Field(30.0, description="An event neither acked nor naked in this time is redelivered.")
    backoff_s: list[Seconds] = Field([1.0, 5.0, 15.0, 30.0], description="Redelivery delays after failures.")
    executions_ttl_s: Seconds = Field(7 * 24 * 3600.0, description="How long executed action ids are kept.")

    @model_validator(mode="after")
    def _backoff_fits(self) -> Self:
        if len(self.backoff_s) > self.max_deliver:
            raise ValueError("backoff_s may not have more entries than max_deliver")
        return self


class PluginSettings(Section):
    enabled: bool = True
    permissions: list[Permission] | None = Field(
        None, description="Granted permissions; unset: the manifest's non-dangerous ones."
    )
    config: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(None, description="Run this plugin as this user instead of confinement.user.")
    groups: list[str] = Field(
        default_factory=list, description='Supplementary groups of the plugin process, e.g. ["docker"].'
    )

    def granted(self, manifest: Manifest) -> frozenset[Permission]:
        if self.permissions is not None:
            return frozenset(self.permissions)
        return frozenset(p for p in manifest.permissions if p not in DANGEROUS)


class ConfinementConfig(Section):
    """How local plugin processes are confined: the user they run as, their rlimits."""

    user: str = Field(
        "tuxpilot-plugin",
        description="Unprivileged user plugins run as when the agent runs as root; created when missing.",
    )
    strict: bool = Field(
        False,
        description="Refuse to start a plugin that cannot run as `user`; false: run it as root, with a warning.",
    )
    default_limits: Limits = Field(
        Limits(memory_mb=2048, open_files=1024),
        description="rlimits of a plugin whose manifest sets none: memory_mb is address space (RLIMIT_AS).",
    )
    max_limits: Limits = Field(
        Limits(memory_mb=8192, open_files=65536, processes=4096),
        description="The most a manifest may ask for; more is cut down to this. Unset: no cap.",
    )


class SupervisionConfig(Section):
    """How the plugin host restarts plugin processes and when it calls a crash loop."""

    backoff_start_s: Seconds = 0.5
    backoff_max_s: Seconds = 60.0
    healthy_after_s: Seconds = Field(
        30.0, description="A plugin up this long is healthy again: its backoff starts over, a crash loop is over."
    )
    crash_loop_restarts: Annotated[int, Field(ge=1)] = Field(
        5, description="This many exits within crash_loop_window_s is a crash loop (a plugin.crash_loop event)."
    )
    crash_loop_window_s: Seconds = 60.0


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class Config(Section):
    host_id: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")] = Field(default_factory=default_host_id)
    state_dir: Path = Field(default_factory=default_state_dir)
    subject_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")] = "tuxpilot"
    nats: NatsConfig = NatsConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    monitor: MonitorConfig = MonitorConfig()
    gate: GateConfig = GateConfig()
    streams: StreamsConfig = StreamsConfig()
    plugin_dirs: list[Path] = Field(default_factory=list, description="Folders searched for plugins.")
    run_plugins: list[str] = Field(["sysmon"], description="Local plugins `tuxpilot up` starts and supervises.")
    plugins: dict[str, PluginSettings] = Field(default_factory=dict)
    confinement: ConfinementConfig = ConfinementConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    log: LogConfig = LogConfig()
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this configuration was read from, if any."""
        return self._source

    def plugin(self, name: str) -> PluginSettings:
        return self.plugins.get(name) or PluginSettings()


def _env_overrides(model: type[BaseModel], environ: dict[str, str], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested dict of the values set by `TUXPILOT_*` variables, walking the model's fields."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = (*path, name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested = _env_overrides(annotation, environ, key)
            if nested:
                found[name] = nested
            continue
        raw = environ.get(ENV_PREFIX + "_".join(key).upper())
        if raw is None:
            continue
        if raw[:1] in "[{":
            try:
                found[name] = json.loads(raw)
                continue
            except json.JSONDecodeError:
                pass
        origin = getattr(annotation, "__origin__", None)
        found[name] = [p.strip() for p in raw.split(",") if p.strip()] if origin is list else raw
    return found


def environment_of(section: BaseModel, *path: str) -> dict[str, str]:
    """The `TUXPILOT_*` variables that set `section` (found at `path` in the tree) as it is: the reverse
    of reading them. Unset (None) keys are left out."""
    found: dict[str, str] = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        key = (*path, name)
        if isinstance(value, BaseModel):
            found.update(environment_of(value, *key))
        elif value is not None:
            text = str(value) if isinstance(value, str | Path) else json.dumps(value, default=str)
            found[ENV_PREFIX + "_".join(key).upper()] = text
    return found


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_config_path() -> Path:
    """Where the host config lives when none is named: /etc as root, else the user's config dir."""
    if os.geteuid() == 0:
        return SYSTEM_CONFIG
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tuxpilot" / "tuxpilot.toml"


def config_path(explicit: Path | None = None, environ: dict[str, str] | None = None) -> Path | None:
    """The config file in force: `--config`, else TUXPILOT_CONFIG, else the default one if it exists.

    Given an explicit `environ`, only that environment counts: the default file is not looked for.
    """
    if explicit is not None:
        return explicit
    env = dict(os.environ) if environ is None else environ
    if env.get(ENV_PREFIX + "CONFIG"):
        return Path(env[ENV_PREFIX + "CONFIG"])
    if environ is not None:
        return None
    default = default_config_path()
    return default if default.is_file() else None


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomlkit.dumps(doc))
    return granted


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """The configuration from `path` (or TUXPILOT_CONFIG) and the environment; ConfigError names the bad key."""
    environ = dict(os.environ) if environ is None else environ
    path = config_path(path, environ)
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    # Merge onto the defaults so that setting one key of a section keeps the section's other defaults.
    doc = _merge(_merge(Config().model_dump(), doc), _env_overrides(Config, environ))
    try:
        config = Config.model_validate(doc)
        config._source = path
        return config
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
        where = f" (file {path})" if path else ""
        raise ConfigError(f"config key {key}: {err['msg']}{where}; environment name {env}") from exc
