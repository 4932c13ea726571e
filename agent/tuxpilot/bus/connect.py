"""The NATS connection: subject names, connecting with the configured options, finding the local server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError

from tuxpilot.protocol.errors import Unavailable
from tuxpilot.protocol.launch import CredentialFile
from tuxpilot.protocol.models import Event
from tuxpilot.protocol.names import MSG_ID_HEADER, Subjects, inbox_prefix
from tuxpilot.settings import NatsConfig, NodeSettings

log = structlog.get_logger("tuxpilot.bus")

URL_FILE = "nats.url"


async def publish_event(nc: Client, subjects: Subjects, event: Event, *, ack_wait_s: float = 2.0) -> None:
    """Store one event in the events stream, on `<prefix>.evt.<host>.<category>.<name>`.

    The event id is the JetStream message id: publishing the same event again (a retry after a
    reconnect) is deduplicated by the server within the stream's duplicate window.
    """
    await nc.jetstream().publish(
        subjects.event(event.type, event.host), event.to_json(), headers={MSG_ID_HEADER: event.id}, timeout=ack_wait_s
    )


def operator_file(config: NodeSettings) -> Path:
    return config.state_dir / "credentials" / f"tuxpilot-{config.host_id}-operator.json"


def local_nats(config: NodeSettings) -> NatsConfig:
    """The connection settings for a command on this host: the operator's credentials that a local
    `tuxpilot up` wrote, unless credentials are configured."""
    cfg = config.nats
    if cfg.user or cfg.user_file or cfg.creds or cfg.token:
        return cfg
    found = operator_file(config)
    return cfg.model_copy(update={"user_file": found}) if found.is_file() else cfg


def url_file(state_dir: Path) -> Path:
    return state_dir / URL_FILE


def local_url(config: NodeSettings) -> str | None:
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
    cfg: NatsConfig,
    url: str,
    *,
    name: str,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    give_up_after_s: float | None = None,
) -> Client:
    """A connected client that reconnects by itself and logs every change of its link.

    `give_up_after_s`: a command run by hand must not retry an unreachable server (or refused
    credentials) forever: the first connection must be made within that time, else `Unavailable`
    naming the URL and the last error, and nothing is logged while trying. Once connected, the
    client reconnects as configured.
    """
    blog = log.bind(conn=name)
    first_errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if give_up_after_s is not None and not nc.is_connected and not first_done:
            first_errors.append(text)
            return
        blog.warning("nats.error", error=text)

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):  # a close we asked for is no news
            blog.warning("nats.disconnected")

    async def on_reconnected() -> None:
        blog.info("nats.reconnected", url=str(nc.connected_url.geturl() if nc.connected_url else ""))
        if on_reconnect is not None:
            await on_reconnect()

    user, password = cfg.user, cfg.password
    inbox = inbox_prefix(user) if user else "_INBOX"
    if cfg.user_file is not None:
        creds = CredentialFile.model_validate_json(cfg.user_file.read_text())
        user, password, inbox = creds.user, creds.password, creds.inbox_prefix
    nc = Client()
    first_done = False
    connecting = nc.connect(
        servers=[u.strip() for u in url.split(",") if u.strip()],
        name=name,
        user=user,
        password=password,
        inbox_prefix=inbox,
        token=cfg.token,
        user_credentials=str(cfg.creds) if cfg.creds else None,
        tls=_tls(cfg),
        connect_timeout=int(max(1, cfg.connect_timeout_s)),
        reconnect_time_wait=cfg.reconnect_wait_s,  # type: ignore[arg-type]  # annotated int, used as seconds
        max_reconnect_attempts=cfg.max_reconnect_attempts,
        allow_reconnect=True,
        pending_size=cfg.pending_bytes,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    if give_up_after_s is None:
        await connecting
        return nc
    try:
        await asyncio.wait_for(connecting, give_up_after_s)
    except (TimeoutError, OSError, NatsError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        why = first_errors[-1] if first_errors else f"{type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, TimeoutError) and not first_errors:
            why = f"no answer within {give_up_after_s:g} s"
        raise Unavailable(f"cannot connect to NATS at {url}: {why}") from None
    first_done = True
    return nc
