"""The NATS authorization TuxPilot generates: the broker itself is the sandbox.

One user per local plugin, one for the agent, one for the operator, each allowed exactly the
subjects its role needs (derived from the plugin manifests and the host config). Passwords are
random, kept in owner-only credential files; the server config holds only their bcrypt hashes.
Each user has its own reply-inbox prefix (`_INBOX_<user>`), so no one can read another's replies.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from tuxpilot.protocol.launch import CredentialFile
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.names import (
    GATE_SERVICE,
    Names,
    Subjects,
    approvals_bucket,
    inbox_prefix,
    leases_bucket,
    operator_consumer_name,
    package_index_bucket,
    packages_bucket,
    plugin_consumer_name,
    schedules_bucket,
)

# Every password is 24 random bytes (192 bits): no guess gets anywhere near it, so bcrypt's work factor,
# which protects guessable passwords, buys nothing here, and the server pays it on every connection.
# The minimum cost keeps a connect at ~3 ms instead of ~120 ms at cost 11 (a fleet reconnecting after
# a server restart pays that per host).
PASSWORD_BYTES = 24
BCRYPT_ROUNDS = 4
CREDENTIALS_DIR = "credentials"
AUTH_FILE = "auth.json"


@dataclass
class User:
    """A NATS user and what it may publish and subscribe to."""

    name: str
    role: str
    publish: list[str]
    subscribe: list[str]
    allow_responses: bool = False
    plugin: str | None = None
    password: str = field(default="", repr=False)

    @property
    def inbox(self) -> str:
        return inbox_prefix(self.name)


def _srv(name: str) -> list[str]:
    return [f"$SRV.{verb}{suffix}" for verb in ("PING", "INFO", "STATS") for suffix in ("", f".{name}", f".{name}.*")]


def agent_user(subjects: Subjects) -> User:
    p, h, names = subjects.prefix, subjects.host, Names.of(subjects)
    name = f"tuxpilot-{h}-agent"
    return User(
        name=name,
        role="agent",
        publish=[
            f"{p}.evt.{h}.>",
            f"{p}.metrics.{h}",
            # Only the agent (its gate) reaches the plugins' private execution endpoints.
            f"{p}.exec.{h}.>",
            f"{p}.result.{h}.>",
            # Replies to its operator's requests: allow_responses alone is not enough there, the server
            # forgets which replies it allowed when it reloads the authorization, as loading a plugin does.
            f"{inbox_prefix(operator_name(subjects))}.>",
            "$JS.API.>",  # streams, consumers and buckets for this host's TuxPilot
            "$JS.ACK.>",
            "$JS.FC.>",  # flow-control replies: without them a KV watch or listing stalls
            *(f"$KV.{bucket}.>" for bucket in (names.executions, names.cooldowns, names.plugins,
                                               names.plugin_state, approvals_bucket(subjects),
                                               schedules_bucket(subjects))),
            subjects.approval("*"),  # approval requests it announces
            # Its own leases under any fleet limit, never another host's (`lease_key`).
            f"$KV.{leases_bucket(subjects)}.*.{h}",
            "$SRV.PING",
            "$SRV.PING.*",  # one plugin's instances: the health check after an install or update
        ],
        subscribe=[
            f"{inbox_prefix(name)}.>",
            f"{p}.evt.{h}.>",
            subjects.proposals(),
            subjects.handoffs(),  # proposals handed over by request, answered once decided
            f"{p}.result.{h}.>",
            subjects.agent_control("*"),  # the operator's requests to this agent (loading a plugin run by hand)
            subjects.approve("*"),  # answers to approvals
            subjects.metrics(),  # the last snapshot, which rule conditions read
            # The gate serves the public action endpoints as the micro service `tuxpilot-gate`.
            f"{p}.act.{h}.>",
            *_srv(GATE_SERVICE),
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>",
        ],
        # It answers the requests it may receive, and only those: operators' calls, discovery, loads.
        allow_responses=True,
    )


def plugin_user_name(subjects: Subjects, plugin: str) -> str:
    return f"tuxpilot-{subjects.host}-plugin-{plugin}"


def plugin_user(subjects: Subjects, manifest: Manifest) -> User:
    p, h, n = subjects.prefix, subjects.host, manifest.name
    names, name = Names.of(subjects), plugin_user_name(subjects, n)
    consumer = plugin_consumer_name(n, h)
    publish = [
        # Its own proposal subjects only (stored, and handed over by request): the gate reads the proposer
        # from them.
        subjects.proposal(n),
        subjects.handoff(n),
        *(f"{p}.evt.{h}.{category}.*" for category in manifest.emits),
        # Its own durable consumer, created by the agent from the manifest. No KV or stream writes: the
        # registry bucket is the agent's to write.
        f"$JS.API.CONSUMER.INFO.{names.events}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{names.events}.{consumer}",
        f"$JS.ACK.{names.events}.{consumer}.>",
        f"$JS.API.STREAM.INFO.{names.events}",
    ]
    subscribe = [
        f"{inbox_prefix(name)}.>",
        # Its private execution endpoints, which only the agent's user may publish to.
        f"{p}.exec.{h}.{n}.>",
        *(f"{p}.evt.{h}.{pattern}" for pattern in manifest.subscribes),
        # What the manifest's `reads` names, of this host only.
        *({"results": subjects.results(h), "metrics": subjects.metrics(), "approvals": subjects.approval("*")}[r]
          for r in manifest.reads),
        *_srv(n),
    ]
    return User(name=name, role="plugin", publish=publish, subscribe=subscribe, allow_responses=True, plugin=n)


def operator_name(subjects: Subjects) -> str:
    return f"tuxpilot-{subjects.host}-operator"


def registry_reading(subjects: Subjects) -> list[str]:
    """What reading the fleet registry takes (a KV watch of its index, an object's chunks): consumers on its
    two streams, which hold no TuxPilot durable that a create could re-point."""
    streams = [f"OBJ_{packages_bucket(subjects)}", f"KV_{package_index_bucket(packages_bucket(subjects))}"]
    api = "$JS.API.CONSUMER"
    return [s for st in streams for s in (f"{api}.CREATE.{st}", f"{api}.CREATE.{st}.>", f"{api}.DELETE.{st}.>")]


def registry_writing(subjects: Subjects) -> list[str]:
    """What publishing to the fleet registry takes: its buckets' subjects, creating and purging its streams."""
    packages = packages_bucket(subjects)
    index = package_index_bucket(packages)
    return [f"$O.{packages}.>", f"$KV.{index}.>", f"$JS.API.STREAM.CREATE.OBJ_{packages}",
            f"$JS.API.STREAM.CREATE.KV_{index}", f"$JS.API.STREAM.PURGE.OBJ_{packages}"]


def operator_user(subjects: Subjects) -> User:
    p, name = subjects.prefix, operator_name(subjects)
    # Reading is by message get. A consumer "create" updates an existing durable of the name in its
    # body (even on the unnamed subject), so no create subject but the one naming the operator's own
    # consumer: otherwise a reader could re-point the gate's consumer and silence it.
    own = operator_consumer_name(subjects.host)
    read_js = [
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.>",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.MSG.GET.>",
        "$JS.API.DIRECT.GET.>",
        f"$JS.API.CONSUMER.CREATE.*.{own}",
        f"$JS.API.CONSUMER.CREATE.*.{own}.>",
        "$JS.API.CONSUMER.INFO.>",
        "$JS.API.CONSUMER.NAMES.>",
        "$JS.API.CONSUMER.LIST.>",
        f"$JS.API.CONSUMER.DELETE.*.{own}",
        f"$JS.API.CONSUMER.MSG.NEXT.*.{own}",
        f"$JS.ACK.*.{own}.>",
        "$JS.FC.>",
        *registry_reading(subjects),
        *registry_writing(subjects),  # the host's operator publishes plugin packages
    ]
    return User(
        name=name,
        role="operator",
        publish=[f"{p}.act.>", f"{p}.evt.>", subjects.agent_control("*"), f"{p}.approve.>", "$SRV.>", *read_js],
        subscribe=[f"{inbox_prefix(name)}.>", f"{p}.evt.>", f"{p}.result.>", f"{p}.metrics.>", f"{p}.proposal.>",
                   f"{p}.propose.>", f"{p}.approval.>"],
    )


def users_for(subjects: Subjects, manifests: dict[str, Manifest]) -> list[User]:
    return [
        agent_user(subjects),
        operator_user(subjects),
        *(plugin_user(subjects, m) for _, m in sorted(manifests.items())),
    ]


# -- secrets on disk -----------------------------------------------------------------------------


def _write_private(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(doc, out, indent=2)
    os.chmod(path, 0o600)


def credential_file(state_dir: Path, user: str) -> Path:
    return state_dir / CREDENTIALS_DIR / f"{user}.json"


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def provision(state_dir: Path, users: list[User], url: str | None = None) -> dict[str, str]:
    """Give each user its password (kept across restarts) and write its credential file (0600).

    Returns the bcrypt hashes by user; computed hashes are cached next to the passwords, so a
    restart does not pay bcrypt's cost again.
    """
    store = state_dir / CREDENTIALS_DIR / AUTH_FILE
    try:
        known: dict[str, dict[str, str]] = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    hashes: dict[str, str] = {}
    for user in users:
        entry = known.get(user.name)
        if entry is None:
            password = secrets.token_urlsafe(PASSWORD_BYTES)
            entry = known[user.name] = {"password": password, "hash": _hash(password)}
        elif not entry["hash"].startswith(f"$2b${BCRYPT_ROUNDS:02d}$"):  # cached at another cost: same password
            entry["hash"] = _hash(entry["password"])
        user.password = entry["password"]
        hashes[user.name] = entry["hash"]
        entry_doc = CredentialFile(user=user.name, password=user.password, inbox_prefix=user.inbox, url=url)
        _write_private(credential_file(state_dir, user.name), entry_doc.model_dump(exclude_none=True))
    _write_private(store, known)
    return hashes


def forget(state_dir: Path, names: list[str]) -> None:
    """Delete these users' passwords and credential files (a plugin removed from the host)."""
    store = state_dir / CREDENTIALS_DIR / AUTH_FILE
    try:
        known: dict[str, dict[str, str]] = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    for name in names:
        known.pop(name, None)
        credential_file(state_dir, name).unlink(missing_ok=True)
    _write_private(store, known)


def server_config(users: list[User], hashes: dict[str, str]) -> str:
    """The `authorization` block for nats-server; no plain password in it."""
    entries = []
    for user in users:
        permissions: dict[str, Any] = {
            "publish": {"allow": user.publish},
            "subscribe": {"allow": user.subscribe},
        }
        if user.allow_responses:
            permissions["allow_responses"] = True
        entries.append({"user": user.name, "password": hashes[user.name], "permissions": permissions})
    # JSON is valid nats-server config syntax.
    return "authorization {\n  users = " + json.dumps(entries, indent=2) + "\n}\n"


def describe(users: list[User]) -> list[dict[str, Any]]:
    return [
        {
            "user": u.name,
            "role": u.role,
            "publish": u.publish,
            "subscribe": u.subscribe,
            "allow_responses": u.allow_responses,
        }
        for u in users
    ]
