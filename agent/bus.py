"""The NATS connection: subject names, connecting with the configured options, finding the local server."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import structlog
from nats.aio.client import Client

from agent.config import Config, NatsConfig
from agent.models import Event

log = structlog.get_logger("tuxpilot.bus")

URL_FILE = "nats.url"


@dataclass(frozen=True)
class Subjects:
    """Builds every subject in DESIGN.md for one prefix and one (default) host."""

    prefix: str
    host: str

    def event(self, event_type: str, host: str | None = None) -> str:
        return f"{self.prefix}.evt.{host or self.host}.{event_type}"

    def events(self, pattern: str = "*.*", host: str | None = "*") -> str:
        """Subscription pattern for events; `pattern` is category.name with `*` or `>` wildcards."""
        return f"{self.prefix}.evt.{host or self.host}.{pattern}"

    def metrics(self, host: str | None = None) -> str:
        return f"{self.prefix}.metrics.{host or self.host}"

    def proposal(self, host: str | None = None) -> str:
        return f"{self.prefix}.proposal.{host or self.host}"

    def act(self, plugin: str, action: str, host: str | None = None) -> str:
        return f"{self.prefix}.act.{host or self.host}.{plugin}.{action}"

    def result(self, plugin: str, action: str, host: str | None = None) -> str:
        return f"{self.prefix}.result.{host or self.host}.{plugin}.{action}"

    def results(self, host: str = "*") -> str:
        return f"{self.prefix}.result.{host}.>"

    @property
    def bucket_prefix(self) -> str:
        """JetStream bucket and stream names allow no dots."""
        return self.prefix.replace(".", "_")

    @classmethod
    def of(cls, config: Config) -> Subjects:
        return cls(prefix=config.subject_prefix, host=config.host_id)


async def publish_event(nc: Client, subjects: Subjects, event: Event, *, ack_wait_s: float = 2.0) -> None:
    """Store one event in the events stream, on `<prefix>.evt.<host>.<category>.<name>`.

    The event id is the JetStream message id: publishing the same event again (a retry after a
    reconnect) is deduplicated by the server within the stream's duplicate window.
    """
    await nc.jetstream().publish(
        subjects.event(event.type, event.host), event.to_json(), headers={"Nats-Msg-Id": event.id}, timeout=ack_wait_s
    )


def inbox_prefix(user: str) -> str:
    """Each user's own reply inboxes, so that permissions can keep others out of them."""
    return "_INBOX_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in user)


def operator_file(config: Config) -> Path:
    return config.state_dir / "credentials" / f"tuxpilot-{config.host_id}-operator.json"


def local_nats(config: Config) -> NatsConfig:
    """The connection settings for a command on this host: the operator's credentials that a local
    `tuxpilot up` wrote, unless credentials are configured."""
    cfg = config.nats
    if cfg.user or cfg.user_file or cfg.creds or cfg.token:
        return cfg
    found = operator_file(config)
    return cfg.model_copy(update={"user_file": found}) if found.is_file() else cfg


def url_file(state_dir: Path) -> Path:
    return state_dir / URL_FILE


def local_url(config: Config) -> str | None:
    """The server to use: the configured one, else the one a local `tuxpilot up` wrote into the state dir."""
    if config.nats.url:
        return config.nats.url
    try:
        return url_file(config.state_dir).read_text().strip() or None
    except OSError:
        return None


def _tls(cfg: NatsConfig) -> ssl.SSLContext | None:
    if not (cfg.tls_ca or cfg.tls_cert):
        return None
    context = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
    if cfg.tls_cert:
        context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key) if cfg.tls_key else None)
    return context


async def connect(
    cfg: NatsConfig, url: str, *, name: str, on_reconnect: Callable[[], Awaitable[None]] | None = None
) -> Client:
    """A connected client that reconnects by itself and logs every change of its link."""
    blog = log.bind(conn=name)

    async def on_error(exc: Exception) -> None:
        blog.warning("nats.error", error=f"{type(exc).__name__}: {exc}")

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):  # a close we asked for is no news
            blog.warning("nats.disconnected")

    async def on_reconnected() -> None:
        blog.info("nats.reconnected", url=str(nc.connected_url.geturl() if nc.connected_url else ""))
        if on_reconnect is not None:
            await on_reconnect()

    user, password = cfg.user, cfg.password
    if cfg.user_file is not None:
        doc = json.loads(cfg.user_file.read_text())
        user, password = doc["user"], doc["password"]
    nc = await nats.connect(
        servers=[u.strip() for u in url.split(",") if u.strip()],
        name=name,
        user=user,
        password=password,
        inbox_prefix=inbox_prefix(user) if user else "_INBOX",
        token=cfg.token,
        user_credentials=str(cfg.creds) if cfg.creds else None,
        tls=_tls(cfg),
        connect_timeout=int(max(1, cfg.connect_timeout_s)),
        reconnect_time_wait=cfg.reconnect_wait_s,
        max_reconnect_attempts=cfg.max_reconnect_attempts,
        allow_reconnect=True,
        pending_size=cfg.pending_bytes,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    return nc
