// @ts-check
/**
 * Every name on the wire, as docs/protocol.md states them and as `tuxpilot/protocol/names.py`
 * formats them for the Python side: subjects, headers, the durable consumer, inbox prefixes, the
 * proposal id. Formatted here and nowhere else in this SDK.
 * @module
 */

export const ACTION_ID_HEADER = "Tuxpilot-Action-Id";
export const EVENT_ID_HEADER = "Tuxpilot-Event-Id";
export const MSG_ID_HEADER = "Nats-Msg-Id";
export const ERROR_HEADER = "Nats-Service-Error";
export const ERROR_CODE_HEADER = "Nats-Service-Error-Code";
/** The environment variable that carries the plugin's manifest (JSON) from its host. */
export const MANIFEST_ENV = "TUXPILOT_MANIFEST";

export class Subjects {
  /**
   * @param {string} prefix
   * @param {string} host
   */
  constructor(prefix, host) {
    this.prefix = prefix;
    this.host = host;
  }

  /** @param {string} eventType category.name */
  event(eventType) {
    return `${this.prefix}.evt.${this.host}.${eventType}`;
  }

  /** @param {string} pattern category.name with `*` wildcards */
  events(pattern) {
    return `${this.prefix}.evt.${this.host}.${pattern}`;
  }

  metrics() {
    return `${this.prefix}.metrics.${this.host}`;
  }

  /** @param {string} plugin */
  proposal(plugin) {
    return `${this.prefix}.proposal.${this.host}.${plugin}`;
  }

  /**
   * Where a plugin hands a proposal to the host's gate by request (core NATS), instead of storing it.
   * @param {string} plugin
   */
  handoff(plugin) {
    return `${this.prefix}.propose.${this.host}.${plugin}`;
  }

  /**
   * The private execution subject a plugin serves; only the agent may publish there.
   * @param {string} plugin
   * @param {string} action
   */
  exec(plugin, action) {
    return `${this.prefix}.exec.${this.host}.${plugin}.${action}`;
  }

  /** @param {string} [host] a host, or `*` */
  results(host = "*") {
    return `${this.prefix}.result.${host}.>`;
  }

  /** JetStream stream and bucket names allow no dots. */
  get bucketPrefix() {
    return this.prefix.replaceAll(".", "_");
  }

  get eventsStream() {
    return `${this.bucketPrefix}_events`;
  }
}

/**
 * The durable consumer one plugin's replicas share on one host.
 * @param {string} plugin
 * @param {string} host
 */
export function pluginConsumerName(plugin, host) {
  return `${plugin}-${host}`;
}

/**
 * Each user's own reply inboxes, so that permissions keep others out of them.
 * @param {string} user
 */
export function inboxPrefix(user) {
  return "_INBOX_" + user.replace(/[^A-Za-z0-9_-]/g, "_");
}

/**
 * The proposal a plugin makes for one event: the same id on every redelivery, so the proposals
 * stream stores it once within its duplicate window.
 * @param {string} eventId
 * @param {string} plugin
 */
export function proposalId(eventId, plugin) {
  return `${eventId}-${plugin}`.slice(0, 128);
}
