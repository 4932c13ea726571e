"""Leaf hosts: a host whose agent talks to a nats-server of its own, a leaf node of the fleet's hub with its
own JetStream domain, so that it keeps deciding and executing while the link to the hub is down.

The leaf server runs in the fleet's operator mode with the JWTs of the host's enrolment preloaded (it asks
no resolver, so it starts with the hub away), and connects to the hub as the host's `leaf` user, whose
template lets only the host's own traffic cross (`scopes.leaf_permissions`). The host's records stay in its
own domain's audit stream; the hub's audit stream *sources* each leaf host's audit stream through
`$JS.<domain>.API`. The source keeps its position in the hub's stream, so after a cut it resumes where
it stopped: every record reaches the hub once, none twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuxpilot.fleet.admin import Enrollment
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.names import leaf_domain


def leaf_block(enrollment: Enrollment, leaf_creds: Path) -> str:
    """The leaf server's config but its listen address and JetStream store: operator mode with the
    enrolment's JWTs preloaded, and the remote to the hub as the host's leaf user."""
    trust = enrollment.leaf
    if trust is None:
        raise ConfigError(f"{enrollment.host} was not enrolled as a leaf host: `tuxpilot fleet enroll "
                          f"{enrollment.host} --leaf`")
    urls = ", ".join(json.dumps(u) for u in trust.urls)
    return "\n".join([
        f'server_name: "{leaf_domain(enrollment.host)}"',
        f"operator: {json.dumps(trust.operator_jwt)}",
        f'system_account: "{trust.system_account}"',
        # No resolver to ask while cut off: the accounts as they were at enrolment. A revocation still
        # takes effect where it matters, on the hub, which then refuses this host's leaf connection.
        "resolver: MEMORY",
        "resolver_preload {",
        f"  {trust.system_account}: {json.dumps(trust.system_jwt)}",
        f"  {enrollment.account}: {json.dumps(trust.account_jwt)}",
        "}",
        "leafnodes {",
        "  reconnect: 1s",
        "  remotes: [",
        f"    {{ urls: [{urls}], credentials: {json.dumps(str(leaf_creds))}, account: \"{enrollment.account}\" }}",
        "  ]",
        "}",
    ]) + "\n"


def leaf_config(enrollment: Enrollment, leaf_creds: Path, *, store_dir: Path, port: int = 4222,
                host: str = "127.0.0.1") -> str:
    """The whole config of a leaf host's own server (`nats-server -c`): local clients on `host:port`."""
    return "\n".join([
        f'listen: "{host}:{port}"',
        "jetstream {",
        f"  store_dir: {json.dumps(str(store_dir))}",
        "  sync_interval: 1s",
        f"  domain: {leaf_domain(enrollment.host)}",
        "}",
        leaf_block(enrollment, leaf_creds),
    ])
