"""The settings every TuxPilot process shares: the host's identity, the connection, the streams, the log.

The agent's configuration (`tuxpilot.agent.config`) extends `NodeSettings` with its own sections; a
plugin process reads only these, from the `TUXPILOT_*` environment its host gives it. Every key has an
environment name derived from its path: `nats.url` is `TUXPILOT_NATS_URL`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.launch import CONFIG as CONFIG_ENV
from tuxpilot.protocol.launch import env_name

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
PerSubject = Annotated[int, Field(ge=1)]


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


class StreamsConfig(Section):
    """JetStream streams the agent creates (idempotently) for events, proposals and the audit trail."""

    replicas: Annotated[int, Field(ge=0, le=5)] = Field(
        0, description="Copies of each stream and bucket; 0: 3 when the cluster has 3 or more servers, else 1."
    )
    duplicate_window_s: Seconds = 120.0
    events_max_age_s: Seconds = 24 * 3600.0
    events_max_bytes: int = 256 * 1024 * 1024
    events_max_msgs_per_subject: PerSubject = Field(
        10_000, description="Events kept per subject (host, category, name); the oldest of that subject go first."
    )
    proposals_max_age_s: Seconds = 24 * 3600.0
    proposals_max_bytes: int = 256 * 1024 * 1024
    proposals_max_msgs_per_subject: PerSubject = Field(
        10_000, description="Proposals kept per subject; the oldest of that subject go first."
    )
    audit_max_age_s: Seconds = 30 * 24 * 3600.0
    audit_max_bytes: int = 1024 * 1024 * 1024
    audit_max_msgs_per_subject: PerSubject = Field(
        50_000,
        description="Audit records kept per subject (host, plugin, action): a flood on one subject evicts "
        "only that subject's oldest records.",
    )
    max_deliver: Annotated[int, Field(ge=1)] = Field(5, description="Deliveries of one event to a plugin.")
    ack_wait_s: Seconds = Field(30.0, description="An event neither acked nor naked in this time is redelivered.")
    backoff_s: list[Seconds] = Field([1.0, 5.0, 15.0, 30.0], description="Redelivery delays after failures.")
    executions_ttl_s: Seconds = Field(7 * 24 * 3600.0, description="How long executed action ids are kept.")
    executions_max_bytes: Annotated[int, Field(ge=1024 * 1024)] = Field(
        256 * 1024 * 1024, description="Size of the executions bucket; when full, the oldest claims go first."
    )
    cooldowns_max_age_s: Seconds = Field(
        7 * 24 * 3600.0,
        description="The longest a cooldown is kept across a restart; each key expires after its own cooldown.",
    )
    cooldowns_max_bytes: Annotated[int, Field(ge=1024 * 1024)] = Field(
        64 * 1024 * 1024, description="Size of the cooldowns bucket; when full, the oldest keys go first."
    )

    @model_validator(mode="after")
    def _backoff_fits(self) -> Self:
        if len(self.backoff_s) > self.max_deliver:
            raise ValueError("backoff_s may not have more entries than max_deliver")
        return self


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class NodeSettings(Section):
    """What names this host on the bus and how to reach it: shared by the agent and its plugins."""

    host_id: Annotated[str, Field(pattern=r"^[a-z0-9_-]{1,64}$")] = Field(default_factory=default_host_id)
    state_dir: Path = Field(default_factory=default_state_dir)
    subject_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")] = "tuxpilot"
    nats: NatsConfig = NatsConfig()
    streams: StreamsConfig = StreamsConfig()
    log: LogConfig = LogConfig()
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file these settings were read from, if any."""
        return self._source


def env_overrides(model: type[BaseModel], environ: dict[str, str], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested dict of the values set by `TUXPILOT_*` variables, walking the model's fields."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = (*path, name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested = env_overrides(annotation, environ, key)
            if nested:
                found[name] = nested
            continue
        raw = environ.get(env_name(*key))
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
            found[env_name(*key)] = text
    return found


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
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
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    if environ is not None:
        return None
    default = default_config_path()
    return default if default.is_file() else None


S = TypeVar("S", bound=BaseModel)


def load_settings(model: type[S], path: Path | None = None, environ: dict[str, str] | None = None, *,
                  partial: bool = False) -> S:
    """`model` from the TOML file at `path` (or TUXPILOT_CONFIG) and the environment; ConfigError names the
    bad key. `partial`: keys of the file that `model` does not have are left out (a plugin process reads
    the sections it knows of the host's file), instead of refused."""
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
    if partial:
        doc = {k: v for k, v in doc.items() if k in model.model_fields}
    # Merge onto the defaults so that setting one key of a section keeps the section's other defaults.
    doc = merge(merge(model().model_dump(), doc), env_overrides(model, environ))
    try:
        settings = model.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = env_name(*(str(p) for p in err["loc"]))
        where = f" (file {path})" if path else ""
        raise ConfigError(f"config key {key}: {err['msg']}{where}; environment name {env}") from exc
    if isinstance(settings, NodeSettings):
        settings._source = path
    return settings
