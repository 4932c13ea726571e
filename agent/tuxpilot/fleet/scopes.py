"""What each role on an enrolled host may touch: the templates of the host's scoped signing keys.

nats-server gives every user signed by a scoped key exactly its template's permissions, so a host
holding its keys can mint users (its agent, its plugins, its operator) without any server change, and
none of them can reach past the host's own subjects. A plugin's user is named after the plugin, and
`{{name()}}` in the template keeps each plugin on its own subjects as on a single host.
"""

from __future__ import annotations

from tuxpilot.bus import auth
from tuxpilot.bus.jwt import Scope
from tuxpilot.protocol.names import (
    FLEET_INBOX,
    Names,
    Subjects,
    approvals_bucket,
    fleet_bucket,
    inbox_prefix,
    leaf_deliver,
    leaf_domain,
    leases_bucket,
    package_index_bucket,
    packages_bucket,
    schedules_bucket,
)

ROLES = ("agent", "operator", "plugin", "leaf")
# Replaced by nats-server with each plugin user's name (the plugin's name) when the user connects.
NAME = "{{name()}}"


def agent_permissions(subjects: Subjects) -> tuple[list[str], list[str]]:
    user = auth.agent_user(subjects)
    # The gate's private execution endpoints on its own host (listed once whether auth names them or not).
    private = f"{subjects.prefix}.exec.{subjects.host}.>"
    # Fleet-wide calls reach every host's gate on one subject (no queue group); the gate answers those
    # that target its host.
    fleet_calls = f"{subjects.prefix}.fleet.act.*.*"
    # …and every targeted host's agent (installing a plugin fleet-wide) likewise.
    fleet_control = subjects.fleet_agent("*")
    beat = f"$KV.{fleet_bucket(subjects)}.{subjects.host}"  # its own heartbeat key, no other host's
    # In every bucket the hosts share, its own keys only: each key starts with the host (`<host>.…`), so a
    # host can neither take another's claim or cooldown, nor rewrite its registry entries, plugin states,
    # approvals or schedule times. (On a single host the agent's user keeps the whole buckets.)
    shared = {f"$KV.{bucket}.>": f"$KV.{bucket}.{subjects.host}.>" for bucket in host_keyed_buckets(subjects)}
    publish = [shared.get(s, s) for s in user.publish if s != "$JS.API.>"]
    publish += [*([private] if private not in publish else []), beat, *agent_js_api(subjects)]
    return publish, [*user.subscribe, fleet_calls, fleet_control]


def agent_js_api(subjects: Subjects) -> list[str]:
    """The JetStream API a fleet host's agent uses, instead of all of it: reading streams and buckets, the
    consumers it keeps, and creating a shared stream or bucket when it is missing. No other stream: one of
    its own could capture another host's subjects (`P.act.<host>.>`: its acknowledgements would answer the
    callers of that host's gate before the gate does) or source or mirror any stream."""
    creatable = [s for s in shared_streams(subjects) if s != f"KV_{leases_bucket(subjects)}"]
    return ["$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST",
            "$JS.API.STREAM.MSG.GET.>", "$JS.API.DIRECT.GET.>", "$JS.API.CONSUMER.>",
            *(f"$JS.API.STREAM.CREATE.{s}" for s in creatable)]


def host_keyed_buckets(subjects: Subjects) -> list[str]:
    """The shared buckets whose keys all begin with the host that writes them (docs/protocol.md, KV keys)."""
    names = Names.of(subjects)
    return [names.executions, names.cooldowns, names.plugins, names.plugin_state, approvals_bucket(subjects),
            schedules_bucket(subjects)]


def shared_streams(subjects: Subjects) -> list[str]:
    """Every stream the fleet's hosts share (buckets by their streams): the fleet's administrator creates and
    configures them (`fleet/hub.py`), no host."""
    names, packages = Names.of(subjects), packages_bucket(subjects)
    buckets = [*host_keyed_buckets(subjects), fleet_bucket(subjects), leases_bucket(subjects),
               package_index_bucket(packages)]
    return [names.events, names.proposals, names.audit, *(f"KV_{b}" for b in buckets), f"OBJ_{packages}"]


def agent_denied(subjects: Subjects) -> list[str]:
    """What the agent's `$JS.API.>` must not reach in the streams every host shares: nothing that rewrites,
    empties or deletes one (a host could otherwise drop another's events, proposals, records, claims or
    leases, or turn rollups on in a bucket, one of which purges every key). The lease bucket is not even
    created by a host; the others a host creates when missing (a single host, or a fleet whose
    administrator has not prepared the hub yet), as configured, and cannot change once they exist."""
    verbs = ("UPDATE", "DELETE", "PURGE", "MSG.DELETE")
    leases = f"KV_{leases_bucket(subjects)}"
    return [*(f"$JS.API.STREAM.{v}.{s}" for s in shared_streams(subjects) for v in verbs),
            f"$JS.API.STREAM.CREATE.{leases}"]


def leaf_permissions(subjects: Subjects) -> tuple[list[str], list[str]]:
    """The host's leaf node connection to the hub. On a leaf connection `publish` is what flows from the
    host's leaf server into the hub and `subscribe` what flows from the hub down to it. Up: the copies of
    its audit records and heartbeats that the hub's audit stream and heartbeats bucket source (on its own
    delivery subject only), the answers to the hub's consumer requests, the answers to fleet-wide calls.
    Down: the hub's requests to its JetStream domain about those two streams alone, flow control, and
    fleet-wide calls. Nothing else: its records reach the hub only by sourcing (no copy published twice),
    no other host's traffic reaches it, and it answers no request but a fleet-wide call (allow_responses
    does not cover a leaf connection, and a right on every reply inbox would let it answer any request)."""
    h = subjects.host
    api = f"$JS.{leaf_domain(h)}.API"
    # `$JSC.R.>`: the answers to the hub's consumer requests (allow_responses does not cover a leaf
    # connection). Another leaf host could answer one of those in this host's place, which stalls its source
    # until the hub retries; it cannot put a record in the audit: that takes this host's delivery subject.
    # Fleet-wide calls come down and their answers go up on the fleet's reply inbox (an answer names its
    # host in a header, which any host receiving the same call could set: no worse than on the hub).
    publish = [f"{leaf_deliver(subjects)}.>", "$JSC.R.>", f"{FLEET_INBOX}.>"]
    subscribe = [f"$JS.FC.{leaf_domain(h)}.>", subjects.fleet_act("*", "*")]
    for stream in (Names.of(subjects).audit, f"KV_{fleet_bucket(subjects)}"):  # what the hub sources
        subscribe += [f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
                      f"{api}.CONSUMER.DELETE.{stream}.>", f"{api}.CONSUMER.INFO.{stream}.>",
                      f"{api}.STREAM.INFO.{stream}", f"$JS.FC.{stream}.>"]
    return publish, subscribe


def operator_permissions(subjects: Subjects) -> tuple[list[str], list[str]]:
    """The host-local operator: its host's actions, events and records only (a fleet's own admin
    credential reaches every host)."""
    p, h = subjects.prefix, subjects.host
    single = auth.operator_user(subjects)
    # It reads the fleet's registry (installing from it) but does not publish to it: the fleet's admin does.
    writing = set(auth.registry_writing(subjects))
    js = [s for s in single.publish if s.startswith("$JS.") and s not in writing]
    publish = [f"{p}.act.{h}.>", f"{p}.evt.{h}.>", subjects.agent_control("*"), "$SRV.>", *js]
    subscribe = [f"{inbox_prefix(single.name)}.>", f"{p}.evt.{h}.>", f"{p}.result.{h}.>", f"{p}.metrics.{h}",
                 f"{p}.proposal.{h}", f"{p}.proposal.{h}.>", f"{p}.propose.{h}.>"]
    return publish, subscribe


def plugin_permissions(subjects: Subjects) -> tuple[list[str], list[str]]:
    """A plugin named by its user: its own proposal subject, durable consumer and private execution
    endpoint, as on a single host: no bucket key (the registry is the agent's to write) and not the
    public `act` endpoint (only the gate serves it). It reads its host's events; unlike a single host it
    may emit none (the categories a manifest may emit are not part of a key's template)."""
    p, h = subjects.prefix, subjects.host
    names = Names.of(subjects)
    consumer = f"{NAME}-{h}"  # plugin_consumer_name(plugin, host)
    publish = [
        f"{p}.proposal.{h}.{NAME}",
        f"{p}.propose.{h}.{NAME}",
        f"$JS.API.CONSUMER.INFO.{names.events}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{names.events}.{consumer}",
        f"$JS.ACK.{names.events}.{consumer}.>",
        f"$JS.API.STREAM.INFO.{names.events}",
    ]
    subscribe = [
        f"{inbox_prefix(f'tuxpilot-{h}-plugin-')}{NAME}.>",
        f"{p}.exec.{h}.{NAME}.>",
        f"{p}.evt.{h}.>",
        *(f"$SRV.{verb}{suffix}" for verb in ("PING", "INFO", "STATS") for suffix in ("", f".{NAME}", f".{NAME}.*")),
    ]
    return publish, subscribe


def scope(role: str, subjects: Subjects, key: str) -> Scope:
    publish, subscribe = {"agent": agent_permissions, "operator": operator_permissions,
                          "plugin": plugin_permissions, "leaf": leaf_permissions}[role](subjects)
    return Scope(key=key, role=f"{subjects.host}.{role}", publish=publish, subscribe=subscribe,
                 allow_responses=role != "operator", description=f"host {subjects.host}: {role}",
                 deny_publish=tuple(agent_denied(subjects)) if role == "agent" else ())


def user_name(role: str, subjects: Subjects, plugin: str | None = None) -> str:
    """The name a minted user carries: fixed for agent and operator (their inbox prefix follows from it),
    the plugin's own name for a plugin (the template's `{{name()}}`)."""
    if role == "plugin":
        assert plugin is not None
        return plugin
    return f"tuxpilot-{subjects.host}-{role}"


def inbox_of(role: str, subjects: Subjects, plugin: str | None = None) -> str:
    if role == "plugin":
        return inbox_prefix(f"tuxpilot-{subjects.host}-plugin-{plugin}")
    return inbox_prefix(user_name(role, subjects))
