"""Contexts for the `nats` CLI: the JSON file `nats context` reads (`<config dir>/nats/context/<name>.json`,
the selected one named in `<config dir>/nats/context.txt`), so an operator's `nats req` and `nats sub`
connect as a TuxPilot user, with that user's reply-inbox prefix, and nothing else to type."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tuxpilot.protocol.errors import BadRequest
from tuxpilot.protocol.launch import CredentialFile
from tuxpilot.protocol.names import inbox_prefix
from tuxpilot.settings import NatsConfig

# What `nats context` accepts as a name: one path component, no separators.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def config_home(environ: dict[str, str] | None = None) -> Path:
    """Where the `nats` CLI keeps its configuration: `$XDG_CONFIG_HOME/nats`, else `~/.config/nats`."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "nats"


def context_file(name: str, environ: dict[str, str] | None = None) -> Path:
    if not _NAME.match(name):
        raise BadRequest(f"context name {name!r}: letters, digits, '_', '.', '-' (one path component)")
    return config_home(environ) / "context" / f"{name}.json"


def selected_file(environ: dict[str, str] | None = None) -> Path:
    return config_home(environ) / "context.txt"


def selected(environ: dict[str, str] | None = None) -> str | None:
    try:
        return selected_file(environ).read_text().strip() or None
    except OSError:
        return None


def context_doc(url: str, cfg: NatsConfig, *, description: str) -> dict[str, Any]:
    """The context for connecting to `url` with `cfg`'s credentials: user and password (from a credential
    file when `cfg` names one), a creds file, or a token; TLS files; and the user's inbox prefix, which
    the server requires of every TuxPilot user (replies to anyone else's inbox are not delivered)."""
    doc: dict[str, Any] = {"description": description, "url": url}
    user, password = cfg.user, cfg.password
    inbox = inbox_prefix(user) if user else None
    if cfg.user_file is not None:
        creds = CredentialFile.model_validate_json(cfg.user_file.read_text())
        user, password, inbox = creds.user, creds.password, creds.inbox_prefix
    if user:
        doc["user"], doc["password"] = user, password or ""
    if cfg.creds is not None:
        doc["creds"] = str(cfg.creds.resolve())
    if cfg.token:
        doc["token"] = cfg.token
    for key, path in (("ca", cfg.tls_ca), ("cert", cfg.tls_cert), ("key", cfg.tls_key)):
        if path is not None:
            doc[key] = str(path.resolve())
    if inbox:
        doc["inbox_prefix"] = inbox
    return doc


def description(user: str, host: str) -> str:
    """What marks a context as TuxPilot's, for `refresh_urls`."""
    return f"TuxPilot {user} on host {host}"


def refresh_urls(host: str, url: str, environ: dict[str, str] | None = None) -> list[Path]:
    """Point the contexts `tuxpilot auth context` wrote for `host` at `url` (a local `up` listens on a new
    port each start); their credentials stay. The contexts changed."""
    changed = []
    for path in sorted((config_home(environ) / "context").glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        text = doc.get("description") if isinstance(doc, dict) else None
        if isinstance(text, str) and text.startswith("TuxPilot ") and text.endswith(f" on host {host}") \
                and doc.get("url") != url:
            doc["url"] = url
            write_private(path, json.dumps(doc, indent=2) + "\n")
            changed.append(path)
    return changed


def write_private(path: Path, text: str) -> None:
    """Owner-only (0600, in a 0700 folder when it is made): a context holds a password."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)
