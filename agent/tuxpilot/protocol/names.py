"""Every name on the wire, formatted in exactly one place: subjects, headers, stream, bucket and
consumer names, registry keys, reply inbox prefixes. The SDKs, the agent, the CLI and the benchmark
all take their names from here; `docs/protocol.md` describes the same facts for other languages."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

# Headers of an action request the gate sends, and of the reply.
ACTION_ID_HEADER = "Tuxpilot-Action-Id"
EVENT_ID_HEADER = "Tuxpilot-Event-Id"
# JetStream's de-duplication header: events by event id, proposals by proposal id.
MSG_ID_HEADER = "Nats-Msg-Id"
# A fleet-wide call's targets (absent: every host) and the answering host on each reply.
FLEET_HOSTS_HEADER = "Tuxpilot-Hosts"  # host globs, comma-separated: "web-*,db-1"
FLEET_LABELS_HEADER = "Tuxpilot-Labels"  # label=value pairs, comma-separated, all must hold
HOST_HEADER = "Tuxpilot-Host"


class HostIdentity(Protocol):
    """What names a host on the bus: any settings object with these two fields."""

    @property
    def subject_prefix(self) -> str: ...

    @property
    def host_id(self) -> str: ...


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

    def proposal(self, plugin: str, host: str | None = None) -> str:
        """One plugin's proposals: nats-server lets each plugin's user publish only on its own."""
        return f"{self.prefix}.proposal.{host or self.host}.{plugin}"

    def proposals(self, host: str | None = None) -> str:
        """Every plugin's proposals on one host (`*` for every host): what the gate consumes."""
        return f"{self.prefix}.proposal.{host or self.host}.*"

    def proposer(self, subject: str) -> str | None:
        """The plugin a proposal came from, read from the subject nats-server let it publish on."""
        head = f"{self.prefix}.proposal."
        if not subject.startswith(head):
            return None
        tokens = subject[len(head):].split(".")
        return tokens[1] if len(tokens) == 2 and tokens[1] else None

    def handoff(self, plugin: str, host: str | None = None) -> str:
        """Where one plugin hands a proposal to its host's gate by request (a core subject: nothing stores
        it); nats-server lets each plugin's user publish only on its own, as with `proposal`."""
        return f"{self.prefix}.propose.{host or self.host}.{plugin}"

    def handoffs(self, host: str | None = None) -> str:
        """Every plugin's handoffs on one host: what the gate subscribes to."""
        return f"{self.prefix}.propose.{host or self.host}.*"

    def handoff_proposer(self, subject: str) -> str | None:
        """The plugin that handed a proposal over, read from the subject nats-server let it publish on."""
        head = f"{self.prefix}.propose.{self.host}."
        plugin = subject[len(head):] if subject.startswith(head) else ""
        return plugin if plugin and "." not in plugin else None

    def act(self, plugin: str, action: str, host: str | None = None) -> str:
        """The PUBLIC action endpoint, served by the host's gate: operators, rules and schedules call it."""
        return f"{self.prefix}.act.{host or self.host}.{plugin}.{action}"

    def exec(self, plugin: str, action: str, host: str | None = None) -> str:
        """The PRIVATE execution endpoint a plugin serves; only the agent's user may publish to it."""
        return f"{self.prefix}.exec.{host or self.host}.{plugin}.{action}"

    def result(self, plugin: str, action: str, host: str | None = None) -> str:
        return f"{self.prefix}.result.{host or self.host}.{plugin}.{action}"

    def results(self, host: str = "*") -> str:
        return f"{self.prefix}.result.{host}.>"

    def fleet_act(self, plugin: str, action: str) -> str:
        """A fleet-wide call: every host's gate subscribes (no queue group), those targeted answer."""
        return f"{self.prefix}.fleet.act.{plugin}.{action}"

    def fleet_agent(self, verb: str) -> str:
        """A request to every targeted host's agent at once (install, update, remove a plugin): every agent of
        a fleet subscribes, those the request's headers target answer; only the fleet's admin may send."""
        return f"{self.prefix}.fleet.agent.{verb}"

    def agent_control(self, verb: str, host: str | None = None) -> str:
        """A request to the host's agent itself (e.g. `load_plugin`); only its operator may send one."""
        return f"{self.prefix}.agent.{host or self.host}.{verb}"

    def approval(self, approval_id: str, host: str | None = None) -> str:
        """Where the gate announces an action held for approval (plugins may subscribe if declared)."""
        return f"{self.prefix}.approval.{host or self.host}.{approval_id}"

    def approve(self, approval_id: str, host: str | None = None) -> str:
        """Where an approver answers `{"decision": "approve"|"deny"}`; served by the host's agent."""
        return f"{self.prefix}.approve.{host or self.host}.{approval_id}"

    def approvals(self, host: str | None = None) -> str:
        """Request: the host's agent answers with what is pending."""
        return f"{self.prefix}.approvals.{host or self.host}"

    @property
    def bucket_prefix(self) -> str:
        """JetStream bucket and stream names allow no dots."""
        return self.prefix.replace(".", "_")

    @classmethod
    def of(cls, settings: HostIdentity) -> Subjects:
        return cls(prefix=settings.subject_prefix, host=settings.host_id)


@dataclass(frozen=True)
class Names:
    """Stream and bucket names for one subject prefix (names allow no dots)."""

    events: str
    proposals: str
    audit: str
    executions: str
    cooldowns: str
    plugins: str
    plugin_state: str  # what each host's agent says of its plugins: running, not runnable, crash loop

    @classmethod
    def of(cls, subjects: Subjects) -> Names:
        p = subjects.bucket_prefix
        return cls(f"{p}_events", f"{p}_proposals", f"{p}_audit", f"{p}_executions", f"{p}_cooldowns", f"{p}_plugins",
                   f"{p}_plugin_state")


def fleet_bucket(subjects: Subjects) -> str:
    """The heartbeat bucket: one key per host (its id), written only by that host's agent."""
    return f"{subjects.bucket_prefix}_fleet"


def leases_bucket(subjects: Subjects) -> str:
    """Fleet concurrency leases: one key per (limit, host), written only by that host's agent."""
    return f"{subjects.bucket_prefix}_leases"


def lease_key(limit: str, host: str) -> str:
    """A host's lease under one fleet limit: `<limit>.<host>`, so a key template can keep a host on its own
    keys (`<limit>` is one token: `lease_group`)."""
    return f"{limit}.{host}"


def lease_group(plugin: str, action: str, selector: dict[str, str]) -> str:
    """One token naming a fleet limit: the action and the hosts it counts (their labels), hashed since label
    values need not be key characters; every host configured alike computes the same one."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    digest = hashlib.sha256(f"{plugin}.{action}|{labels}".encode()).hexdigest()[:16]
    return f"{plugin}_{action}_{digest}"


# JetStream domains: the hub's (every server of the fleet's cluster) and each leaf host's own.
HUB_DOMAIN = "hub"


def leaf_domain(host: str) -> str:
    return f"leaf-{host}"


def leaf_deliver(subjects: Subjects, host: str | None = None) -> str:
    """Where the hub's audit stream receives what it sources from a leaf host's audit: per host, so a leaf's
    connection may publish only its own host's copies."""
    return f"{subjects.prefix}.leafsrc.{host or subjects.host}"


def plugin_consumer_name(plugin: str, host: str) -> str:
    """The durable consumer one plugin's replicas share on one host."""
    return f"{plugin}-{host}"


def operator_consumer_name(host: str) -> str:
    """The one consumer name a host's operator user may create, read from and delete (`op_` names are
    never TuxPilot's own durables)."""
    return f"op_{host}"


def claim_key(host: str, action_id: str) -> str:
    """An action's claim in the executions bucket: `<host>.<action id>`, so that a key template can keep a
    host on its own claims (an action id is a hash of its event, and events are per host)."""
    return f"{host}.{action_id}"


def schedule_key(host: str, schedule: str) -> str:
    """When one of a host's schedules last ran, in the schedules bucket."""
    return f"{host}.{schedule}"


def cooldown_key(host: str, key: str) -> str:
    """A cooldown's key in the cooldowns bucket: per host, the (plugin.action:resource) key hashed, since
    KV keys allow only `[-/_=.a-zA-Z0-9]` and resources ("/var/lib", container names) need not."""
    return f"{host}.{hashlib.sha256(key.encode()).hexdigest()[:40]}"


INBOX_HEAD = "_INBOX_"
# The micro service every host's gate runs for the public action endpoints; its queue group is per host.
GATE_SERVICE = "tuxpilot-gate"


def gate_queue(host: str) -> str:
    return f"{GATE_SERVICE}-{host}"


def inbox_prefix(user: str) -> str:
    """Each user's own reply inboxes, so that permissions can keep others out of them."""
    return INBOX_HEAD + "".join(c if c.isalnum() or c in "-_" else "_" for c in user)


# Where a fleet-wide call's replies come (`fleet/gather.py`): an inbox of its own, so that a leaf host's link
# may carry answers to fleet-wide calls and no other reply into the hub. Only the fleet's admin reads it.
FLEET_INBOX = INBOX_HEAD + "fleet"


def caller_of(reply: str | None) -> str | None:
    """The user whose reply inbox `reply` is (`_INBOX_<user>.…`), or None for any other reply subject.

    nats-server lets each user subscribe only to its own inbox prefix, so a caller that names another
    user's inbox never sees the reply; see the README's Security section for what this proves.
    """
    if not reply or not reply.startswith(INBOX_HEAD):
        return None
    user = reply[len(INBOX_HEAD):].split(".", 1)[0]
    return user or None


def registry_key(host: str, plugin: str) -> str:
    """A plugin's entry in the registry bucket."""
    return f"{host}.{plugin}"


def proposal_id(event_id: str, plugin: str) -> str:
    """The proposal a plugin makes for one event: the same id on every redelivery, so the proposals
    stream stores it once (within its duplicate window)."""
    return f"{event_id}-{plugin}"[:128]


def approvals_bucket(subjects: Subjects) -> str:
    """The KV bucket of approvals, keyed by `approval_key`: pending, then decided, expired or executed."""
    return f"{subjects.bucket_prefix}_approvals"


def schedules_bucket(subjects: Subjects) -> str:
    """When each host's schedules last ran (`<host>.<schedule>`), for the misfire policy after a restart."""
    return f"{subjects.bucket_prefix}_schedules"


def approval_key(host: str, approval_id: str) -> str:
    return f"{host}.{approval_id}"


def packages_bucket(subjects: Subjects) -> str:
    """The fleet registry's object store: one object per package, named by `package_object`."""
    return f"{subjects.bucket_prefix}_packages"


def package_index_bucket(packages: str) -> str:
    """The KV bucket indexing a packages bucket: one entry per published version, keyed by `package_key`."""
    return f"{packages}_index"


def package_object(name: str, version: str) -> str:
    return f"{name}/{name}-{version}.tpkg"


def package_key(name: str, version: str) -> str:
    """`<name>.<version>`: `<name>.>` watches every version of one plugin. KV keys allow no `+`, which
    semver build metadata uses; `_`, which semver allows nowhere, stands for it."""
    return f"{name}.{version.replace('+', '_')}"
