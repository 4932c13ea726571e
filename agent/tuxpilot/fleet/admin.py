"""The fleet's administration: its operator, accounts, server config, and the hosts it enrols.

Everything lives in one folder (mode 0700): `fleet.json` (the seeds and the roster), the server
config(s), `admin.creds` (a fleet-wide user) and `sys.creds` (the system account's user that pushes
account updates). Enrolling or revoking a host changes the fleet account's JWT, which is pushed to the
running servers on `$SYS.REQ.CLAIMS.UPDATE`: no server restart or reload.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from pydantic import BaseModel, Field

from tuxpilot.bus import jwt
from tuxpilot.bus.jwt import Key
from tuxpilot.fleet import scopes
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.protocol.names import HUB_DOMAIN, Subjects

FLEET_FILE = "fleet.json"
CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


class HostRecord(BaseModel):
    labels: dict[str, str] = Field(default_factory=dict)
    keys: dict[str, str] = Field(description="Role → seed of the host's scoped signing key.")
    revoked: bool = False
    leaf: bool = Field(False, description="Runs a leaf server of its own: the hub's audit sources its records.")


class Fleet(BaseModel):
    """`fleet.json`: the secrets and the roster. Only the fleet's administrator holds it."""

    name: str = "tuxpilot"
    prefix: str = "tuxpilot"
    urls: list[str]
    ports: list[int] = Field(default_factory=lambda: [4222])
    cluster_ports: list[int] | None = None
    leaf_port: int | None = Field(None, description="Where the hub's servers accept leaf node connections.")
    leaf_urls: list[str] = Field(default_factory=list, description="Where leaf hosts reach the hub.")
    operator: str
    system: str
    account: str
    hosts: dict[str, HostRecord] = Field(default_factory=dict)

    # -- JWTs ------------------------------------------------------------------------------------
    def operator_jwt(self) -> str:
        return jwt.operator_jwt(Key(self.operator), self.name, Key(self.system).public)

    def system_jwt(self) -> str:
        return jwt.account_jwt(Key(self.system), Key(self.operator), "SYS", jetstream=False)

    def account_jwt(self) -> str:
        """The fleet account with every enrolled, unrevoked host's scoped keys: a revoked host's keys
        are gone, so the server refuses its users and drops their connections."""
        keys = [
            scopes.scope(role, Subjects(self.prefix, host), Key(seed).public)
            for host, record in sorted(self.hosts.items()) if not record.revoked
            for role, seed in sorted(record.keys.items())
        ]
        return jwt.account_jwt(Key(self.account), Key(self.operator), self.name, jetstream=True, scopes=keys)

    def admin_creds(self) -> str:
        return jwt.mint_creds(Key(self.account), f"{self.name}-admin", publish=[">"], subscribe=[">"])

    def sys_creds(self) -> str:
        return jwt.mint_creds(Key(self.system), f"{self.name}-sys", publish=[">"], subscribe=[">"])


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def load(folder: Path) -> Fleet:
    try:
        return Fleet.model_validate_json((folder / FLEET_FILE).read_text())
    except OSError as exc:
        raise ConfigError(f"no fleet in {folder} ({exc.strerror}): run `tuxpilot fleet init` first") from None


def save(folder: Path, fleet: Fleet) -> None:
    _write_private(folder / FLEET_FILE, fleet.model_dump_json(indent=2))


def operator_block(fleet: Fleet, jwt_dir: Path) -> str:
    """Operator mode with the full resolver (account JWTs kept in `jwt_dir`, updates accepted from the
    system account and synchronised between cluster nodes), both accounts preloaded."""
    return "\n".join([
        f"operator: {json.dumps(fleet.operator_jwt())}",
        f'system_account: "{Key(fleet.system).public}"',
        "resolver {",
        "  type: full",
        f"  dir: {json.dumps(str(jwt_dir))}",
        "  allow_delete: false",
        '  interval: "2m"',
        "}",
        "resolver_preload {",
        f"  {Key(fleet.system).public}: {json.dumps(fleet.system_jwt())}",
        f"  {Key(fleet.account).public}: {json.dumps(fleet.account_jwt())}",
        "}",
    ]) + "\n"


def server_config(fleet: Fleet, *, port: int, store_dir: Path, cluster: list[int] | None = None,
                  index: int = 0, host: str = "127.0.0.1") -> str:
    """One server's whole config: listen address, JetStream store, the operator block, the cluster."""
    lines = [
        f'server_name: "n{index}"',
        f'listen: "{host}:{port}"',
        "jetstream {",
        f"  store_dir: {json.dumps(str(store_dir / 'jetstream'))}",
        "  sync_interval: 1s",
        # The hub's domain: a leaf host's server has its own, and the hub reaches it as $JS.<domain>.API.
        f"  domain: {HUB_DOMAIN}",
        "}",
        operator_block(fleet, store_dir / "jwt"),
    ]
    if fleet.leaf_port:
        lines.append(f'leafnodes {{ listen: "{host}:{fleet.leaf_port + index}" }}')
    if cluster:
        routes = ", ".join(f'"nats-route://{host}:{p}"' for i, p in enumerate(cluster) if i != index)
        lines += ["cluster {", f'  name: "{fleet.name}"', f'  listen: "{host}:{cluster[index]}"',
                  f"  routes: [{routes}]", "}"]
    return "\n".join(lines) + "\n"


def init(folder: Path, *, urls: list[str], name: str = "tuxpilot", prefix: str = "tuxpilot",
         ports: list[int] | None = None, cluster_ports: list[int] | None = None, leaf_port: int | None = None,
         leaf_urls: list[str] | None = None) -> Fleet:
    """Create the operator, the system and fleet accounts, the admin credentials and the server
    config(s): `ports` one per server, `cluster_ports` (as many) for a cluster, `leaf_port` (the first
    server's; the next ones follow) where leaf hosts connect."""
    if (folder / FLEET_FILE).exists():
        raise ConfigError(f"{folder / FLEET_FILE} exists: a fleet is already initialised there")
    fleet = Fleet(name=name, prefix=prefix, urls=urls, ports=ports or [4222], cluster_ports=cluster_ports,
                  leaf_port=leaf_port, leaf_urls=leaf_urls or [],
                  operator=Key.new("operator").seed, system=Key.new("account").seed, account=Key.new("account").seed)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    save(folder, fleet)
    write_server_configs(folder, fleet)
    _write_private(folder / "admin.creds", fleet.admin_creds())
    _write_private(folder / "sys.creds", fleet.sys_creds())
    return fleet


def server_config_paths(folder: Path, fleet: Fleet) -> list[Path]:
    if len(fleet.ports) == 1:
        return [folder / "server.conf"]
    return [folder / f"server-n{i}.conf" for i in range(len(fleet.ports))]


def write_server_configs(folder: Path, fleet: Fleet) -> None:
    """The server config(s), with the roster's account JWT preloaded: a server started later (or
    restarted with an empty store) knows every host enrolled so far."""
    for i, (port, path) in enumerate(zip(fleet.ports, server_config_paths(folder, fleet), strict=True)):
        conf = server_config(fleet, port=port, store_dir=folder / "servers" / f"n{i}",
                             cluster=fleet.cluster_ports, index=i)
        _write_private(path, conf)


class LeafTrust(BaseModel):
    """What a leaf host's own server needs to run in the fleet's operator mode with no resolver to ask:
    the operator's and both accounts' JWTs as they were at enrolment, and where the hub is."""

    urls: list[str]
    operator_jwt: str
    system_account: str
    system_jwt: str
    account_jwt: str


class Enrollment(BaseModel):
    """What a host needs to join (`hosts/<host>.json`, 0600): where the servers are, its labels, the
    fleet account, and its scoped signing keys, from which its agent mints every user it runs."""

    host: str
    prefix: str
    urls: list[str]
    account: str = Field(description="The fleet account's public key (users' issuer_account).")
    labels: dict[str, str] = Field(default_factory=dict)
    keys: dict[str, str]
    leaf: LeafTrust | None = Field(None, description="Set for a leaf host: what its own server needs.")


def enroll(folder: Path, host: str, labels: dict[str, str], *, leaf: bool = False) -> tuple[Fleet, Path]:
    fleet = load(folder)
    record = fleet.hosts.get(host)
    if record is None or record.revoked:  # a revoked host comes back only with new keys
        record = HostRecord(keys={role: Key.new("account").seed for role in scopes.ROLES})
    for role in scopes.ROLES:  # a host enrolled before a role existed gets its key now
        record.keys.setdefault(role, Key.new("account").seed)
    if leaf and not (fleet.leaf_port and fleet.leaf_urls):
        raise ConfigError("this fleet accepts no leaf nodes: `tuxpilot fleet init --leaf-port PORT` sets one")
    record.labels = labels or record.labels
    record.leaf = leaf or record.leaf
    fleet.hosts[host] = record
    save(folder, fleet)
    write_server_configs(folder, fleet)
    trust = LeafTrust(urls=fleet.leaf_urls, operator_jwt=fleet.operator_jwt(), system_account=Key(fleet.system).public,
                      system_jwt=fleet.system_jwt(), account_jwt=fleet.account_jwt()) if record.leaf else None
    doc = Enrollment(host=host, prefix=fleet.prefix, urls=fleet.urls, account=Key(fleet.account).public,
                     labels=record.labels, keys=record.keys, leaf=trust)
    path = folder / "hosts" / f"{host}.json"
    _write_private(path, doc.model_dump_json(indent=2))
    return fleet, path


def revoke(folder: Path, host: str) -> Fleet:
    fleet = load(folder)
    if host not in fleet.hosts:
        raise ConfigError(f"{host} is not enrolled in this fleet")
    fleet.hosts[host].revoked = True
    save(folder, fleet)
    write_server_configs(folder, fleet)
    return fleet


async def push(nc: Client, fleet: Fleet, wait_s: float = 5.0) -> dict[str, Any]:
    """Send the fleet account's new JWT to the servers (through the system account); the answer of one."""
    msg = await nc.request(CLAIMS_UPDATE, fleet.account_jwt().encode(), timeout=wait_s)
    answer: dict[str, Any] = json.loads(msg.data or b"{}")
    if "error" in answer:
        raise TuxPilotError(f"the server refused the account update: {answer['error']}", code="unavailable")
    return answer
