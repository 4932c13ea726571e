// @ts-check
/**
 * The JavaScript plugin SDK: declare event handlers and actions; the SDK serves them on NATS as
 * docs/protocol.md says, exactly as the Python SDK does.
 *
 *     const plugin = Plugin.fromEnv();              // the manifest the host handed over
 *     plugin.on("memory.high", async (event, ctx) => [ctx.propose("top", { n: 5 }, { reason: "memory" })]);
 *     plugin.action("top", async (params, ctx) => ({ processes: [] }));
 *     await plugin.run();
 *
 * Actions are a NATS micro service named after the plugin, in a queue group of the same name, on
 * the private `<prefix>.exec.<host>.<plugin>.<action>` subjects that only the agent may publish to.
 * Events come from the durable consumer the agent created for the plugin; each is acked only once
 * its proposal is decided by the gate (handed over by request) or stored.
 * @module
 */

import { randomBytes } from "node:crypto";
import { userInfo } from "node:os";
import { RequestError, TimeoutError, connect, headers } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { Svcm } from "@nats-io/services";
import {
  Conflict,
  ConfigError,
  Forbidden,
  PayloadTooLarge,
  TuxPilotError,
  errorDoc,
  errorStatus,
} from "./errors.js";
import { Logger, levelOf } from "./log.js";
import {
  ACTION_ID_HEADER,
  EVENT_ID_HEADER,
  MSG_ID_HEADER,
  Subjects,
  pluginConsumerName,
  proposalId,
} from "./names.js";
import { Validator } from "./schema.js";
import { manifestFromEnv, settingsFromEnv } from "./settings.js";
import { parse, parseParams } from "./wire.js";

/** Replies kept by action id, so a re-sent request is answered without running the action again. */
export const REMEMBERED_REPLIES = 10_000;
/** Actions one instance runs at once; more wait their turn. */
export const MAX_ACTIONS_IN_FLIGHT = 64;
const MAX_EVENT_BYTES = 1024 * 1024;
const STOP_GRACE_MS = 5000;
/** After a handover the gate did not answer (none there, or not in time): proposals are stored for this long. */
export const HANDOFF_PAUSE_MS = 5000;

/** @typedef {import("./settings.js").Manifest} Manifest */
/** @typedef {import("./settings.js").Settings} Settings */
/** @typedef {import("./log.js").Logger} Log */

/**
 * @typedef {object} Event
 * @property {string} id
 * @property {string} type category.name
 * @property {string} host
 * @property {string} time
 * @property {"info" | "warning" | "critical"} severity
 * @property {string} [source]
 * @property {number | null} [value]
 * @property {number | null} [threshold]
 * @property {string | null} [unit]
 * @property {string | null} [resource]
 * @property {number | null} [ttl]
 * @property {Record<string, unknown>} [data]
 */

/**
 * @typedef {object} ProposedAction
 * @property {string} plugin
 * @property {string} action
 * @property {Record<string, unknown>} params
 * @property {string} [reason]
 * @property {string | null} [resource]
 */

/**
 * @callback EventHandler
 * @param {Event} event
 * @param {Context} ctx
 * @returns {Promise<ProposedAction[] | ProposedAction | null | undefined | void> | ProposedAction[] | ProposedAction | null | undefined | void}
 */

/**
 * @callback ActionHandler
 * @param {Record<string, any>} params validated, with the schema's top-level defaults filled
 * @param {Context} ctx
 * @returns {unknown}
 */

/**
 * @callback Hook
 * @param {Context} ctx
 * @returns {unknown}
 */

/** A small counting semaphore: bounds work in flight. */
class Slots {
  /** @param {number} size */
  constructor(size) {
    this.free = size;
    /** @type {(() => void)[]} */
    this.waiting = [];
  }

  /** @returns {Promise<void>} */
  acquire() {
    if (this.free > 0) {
      this.free -= 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  release() {
    const next = this.waiting.shift();
    if (next) next();
    else this.free += 1;
  }
}

const EVENT_KEYS = new Set([
  "id", "type", "host", "time", "severity", "source", "value", "threshold", "unit", "resource", "ttl", "data",
]);
const ID = /^[A-Za-z0-9_-]{1,128}$/;
const TOKEN = /^[a-z0-9_-]{1,64}$/;
const EVENT_TYPE = /^[a-z0-9_-]{1,64}\.[a-z0-9_-]{1,64}$/;

/**
 * The event document, or why it is not one (garbage is terminated, never redelivered).
 * @param {Uint8Array} raw
 * @returns {Event}
 */
export function parseEvent(raw) {
  const doc = /** @type {Record<string, unknown>} */ (parse(raw, { what: "event", limit: MAX_EVENT_BYTES }));
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) throw new TypeError("an event is a JSON object");
  for (const key of Object.keys(doc)) if (!EVENT_KEYS.has(key)) throw new TypeError(`unknown event field ${key}`);
  const ok =
    typeof doc.id === "string" && ID.test(doc.id) &&
    typeof doc.type === "string" && EVENT_TYPE.test(doc.type) &&
    typeof doc.host === "string" && TOKEN.test(doc.host) &&
    typeof doc.time === "string" && !Number.isNaN(Date.parse(doc.time)) &&
    (doc.severity === "info" || doc.severity === "warning" || doc.severity === "critical") &&
    (doc.data === undefined || (typeof doc.data === "object" && doc.data !== null && !Array.isArray(doc.data)));
  if (!ok) throw new TypeError("not an event: id, type, host, time and severity are required");
  return /** @type {Event} */ (/** @type {unknown} */ (doc));
}

/**
 * Shell-style pattern matching of event types (`disk.*`), as the Python SDK's fnmatch.
 * @param {string} pattern
 * @param {string} eventType
 */
export function matches(pattern, eventType) {
  const source = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replaceAll("*", ".*").replaceAll("?", ".");
  return new RegExp(`^${source}$`).test(eventType);
}

/**
 * The nak delay (seconds) after the `delivered`-th delivery failed.
 * @param {number[]} backoff
 * @param {number} delivered
 */
export function redeliveryDelay(backoff, delivered) {
  if (!backoff.length) return 1;
  return backoff[Math.min(Math.max(delivered, 1), backoff.length) - 1];
}

function currentUser() {
  try {
    return userInfo().username;
  } catch {
    return String(process.geteuid?.() ?? "");
  }
}

/** What a handler gets besides its input: who it is, a bound logger, its settings, ways to talk back. */
export class Context {
  /**
   * @param {Plugin} plugin
   * @param {string} host
   * @param {Log} log
   * @param {Record<string, any>} config
   * @param {import("@nats-io/nats-core").NatsConnection} nc
   * @param {Subjects} subjects
   * @param {{event?: Event, action?: string, actionId?: string}} [scope]
   */
  constructor(plugin, host, log, config, nc, subjects, scope = {}) {
    this.plugin = plugin;
    this.host = host;
    /** The connection: subscribing where the plugin's NATS user may (its manifest's `reads`). */
    this.nc = nc;
    /** This host's subjects, as docs/protocol.md names them. */
    this.subjects = subjects;
    this.log = log;
    this.config = config;
    this.event = scope.event;
    this.action = scope.action;
    this.actionId = scope.actionId;
  }

  /**
   * One of this plugin's own actions, proposed to the gate.
   * @param {string} action
   * @param {Record<string, unknown>} [params]
   * @param {{reason?: string, resource?: string | null}} [options]
   * @returns {ProposedAction}
   */
  propose(action, params = {}, options = {}) {
    if (!(action in (this.plugin.manifest.actions ?? {}))) {
      throw new ConfigError(`${this.plugin.name}: proposes undeclared action ${JSON.stringify(action)}`);
    }
    /** @type {ProposedAction} */
    const proposed = { plugin: this.plugin.name, action, params };
    if (options.reason !== undefined) proposed.reason = options.reason;
    const resource = options.resource === undefined ? this.event?.resource : options.resource;
    if (resource !== undefined && resource !== null) proposed.resource = resource;
    return proposed;
  }

  /**
   * Publish an event of a category the manifest declares in `emits`.
   * @param {string} eventType
   * @param {Partial<Event>} [fields]
   */
  emit(eventType, fields = {}) {
    return this.plugin.emit(eventType, fields);
  }
}

/** A plugin: its manifest, its handlers, and (once started) its NATS service. */
export class Plugin {
  /** @param {Manifest} manifest */
  constructor(manifest) {
    this.manifest = manifest;
    this.name = manifest.name;
    /** @type {[string, EventHandler][]} */
    this.eventHandlers = [];
    /** @type {Map<string, ActionHandler>} */
    this.actions = new Map();
    /** @type {Hook[]} */
    this.startHooks = [];
    /** @type {Hook[]} */
    this.stopHooks = [];
    /** @type {Map<string, Validator>} */
    this.validators = new Map();
    /** @type {Running | null} */
    this.running = null;
    /** @type {((err: Error) => void) | null} */
    this.onFailure = null;
  }

  /**
   * The plugin whose manifest the host handed over in `TUXPILOT_MANIFEST`.
   * @param {Record<string, string | undefined>} [env]
   */
  static fromEnv(env = process.env) {
    return new Plugin(manifestFromEnv(env));
  }

  /**
   * Handle events whose type matches `pattern` (`memory.high`, `disk.*`); it must be subscribed.
   * @param {string} pattern
   * @param {EventHandler} handler
   */
  on(pattern, handler) {
    const subscribed = this.manifest.subscribes ?? [];
    if (!subscribed.some((sub) => sub === pattern || matches(sub, pattern))) {
      throw new ConfigError(`${this.name}: handler for ${JSON.stringify(pattern)}, which the manifest does not subscribe`);
    }
    this.eventHandlers.push([pattern, handler]);
    return this;
  }

  /**
   * Serve action `name`, declared in the manifest with its params schema.
   * @param {string} name
   * @param {ActionHandler} handler
   */
  action(name, handler) {
    if (!(name in (this.manifest.actions ?? {}))) {
      throw new ConfigError(`${this.name}: action ${JSON.stringify(name)} is not declared in plugin.toml`);
    }
    this.actions.set(name, handler);
    return this;
  }

  /** @param {Hook} hook runs after connecting, before serving */
  onStart(hook) {
    this.startHooks.push(hook);
    return this;
  }

  /** @param {Hook} hook runs on the way out, after serving stopped */
  onStop(hook) {
    this.stopHooks.push(hook);
    return this;
  }

  /**
   * The compiled params schema of `action`, compiled once.
   * @param {string} action
   */
  validator(action) {
    let found = this.validators.get(action);
    if (!found) {
      const spec = this.manifest.actions?.[action] ?? {};
      found = new Validator(spec.params ?? { type: "object" }, `params of ${this.name}.${action}`);
      this.validators.set(action, found);
    }
    return found;
  }

  /**
   * Serve the actions and consume the events on a connection.
   * @param {import("@nats-io/nats-core").NatsConnection} nc
   * @param {Settings} settings
   */
  async start(nc, settings) {
    const run = new Running(this, nc, settings);
    run.failed = (err) => this.onFailure?.(err);
    this.running = run;
    await run.start();
  }

  async stop() {
    const run = this.running;
    this.running = null;
    if (run) await run.stop();
  }

  /**
   * @param {string} eventType
   * @param {Partial<Event>} [fields]
   * @returns {Promise<Event>}
   */
  async emit(eventType, fields = {}) {
    const run = this.running;
    if (!run) throw new Error(`plugin ${this.name} is not started`);
    const category = eventType.split(".", 1)[0];
    if (!(this.manifest.emits ?? []).includes(category)) {
      throw new Forbidden(`${this.name} may not emit ${JSON.stringify(category)} events (plugin.toml \`emits\`)`);
    }
    /** @type {Event} */
    const event = {
      severity: "warning",
      data: {},
      ...fields,
      id: randomBytes(16).toString("hex"),
      type: eventType,
      host: run.subjects.host,
      time: new Date().toISOString(),
      source: this.name,
    };
    await run.js.publish(run.subjects.event(eventType), JSON.stringify(event), {
      msgID: event.id,
      timeout: run.settings.requestTimeoutMs,
    });
    return event;
  }

  /**
   * Connect, serve until SIGINT or SIGTERM, then stop cleanly.
   * @param {Settings} [settings]
   */
  async main(settings) {
    settings = settings ?? settingsFromEnv(this.name);
    const log = new Logger({ plugin: this.name, host: settings.hostId }, settings.logLevel);
    const nc = await connect({
      servers: settings.servers,
      name: `tuxpilot-plugin-${this.name}`,
      ...(settings.user ? { user: settings.user, pass: settings.password } : {}),
      ...(settings.token ? { token: settings.token } : {}),
      ...(settings.inboxPrefix ? { inboxPrefix: settings.inboxPrefix } : {}),
      ...(settings.tls ? { tls: settings.tls } : {}),
      timeout: settings.connectTimeoutMs,
      reconnect: true,
      maxReconnectAttempts: settings.maxReconnectAttempts,
      reconnectTimeWait: settings.reconnectWaitMs,
      waitOnFirstConnect: false,
    });
    (async () => {
      for await (const status of nc.status()) {
        if (status.type === "disconnect") log.warning("nats.disconnected", { conn: `tuxpilot-plugin-${this.name}` });
        else if (status.type === "reconnect") log.info("nats.reconnected", { server: status.server });
        else if (status.type === "error") log.warning("nats.error", { error: String(status.error) });
      }
    })().catch(() => {});
    /** @type {() => void} */
    let stop = () => {};
    const stopped = new Promise((resolve) => {
      stop = () => resolve(undefined);
    });
    process.once("SIGTERM", stop);
    process.once("SIGINT", stop);
    const closed = nc.closed().then((err) => {
      if (err) log.error("nats.closed", { error: String(err) });
    });
    /** @type {Promise<never>} */
    const failed = new Promise((_, reject) => {
      this.onFailure = reject;
    });
    try {
      await this.start(nc, settings);
      await Promise.race([stopped, closed, failed]);
    } finally {
      await this.stop();
      if (!nc.isClosed()) await nc.drain().catch(() => {});
    }
  }

  /**
   * The entry point of a plugin process (`node plugin.js`): runs until SIGTERM, and ends the
   * process with the `tuxpilot` command's exit codes (0 done, 2 bad configuration, 3 no server).
   */
  async run() {
    try {
      await this.main();
      process.exitCode = 0;
    } catch (err) {
      process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
      const code = err instanceof ConfigError ? 2 : /** @type {any} */ (err)?.code === "CONNECTION_REFUSED" ? 3 : 1;
      process.exitCode = code;
    }
  }
}

/** One started plugin: its connection, service, consumer and work in flight. */
class Running {
  /**
   * @param {Plugin} plugin
   * @param {import("@nats-io/nats-core").NatsConnection} nc
   * @param {Settings} settings
   */
  constructor(plugin, nc, settings) {
    this.plugin = plugin;
    this.nc = nc;
    this.settings = settings;
    this.js = jetstream(nc, { timeout: settings.requestTimeoutMs });
    this.subjects = new Subjects(settings.subjectPrefix, settings.hostId);
    this.config = { ...(plugin.manifest.config ?? {}), ...settings.config };
    this.instance = randomBytes(16).toString("hex");
    this.log = new Logger({ plugin: plugin.name, host: settings.hostId }, levelOf(settings.logLevel));
    this.slots = new Slots(MAX_ACTIONS_IN_FLIGHT);
    /** @type {Set<Promise<unknown>>} */
    this.inFlight = new Set();
    /** @type {Map<string, {action: string, reply: Promise<Reply>}>} */
    this.replies = new Map();
    /** @type {Record<string, {ok: number, error: number, ms_total: number}>} */
    this.counts = {};
    /** @type {import("@nats-io/services").Service | null} */
    this.service = null;
    /** @type {import("@nats-io/jetstream").ConsumerMessages | null} */
    this.messages = null;
    this.stopping = false;
    /** @type {Promise<void> | null} */
    this.pulling = null;
    /** @type {((err: Error) => void) | null} called when serving failed for good */
    this.failed = null;
    /** Until when (performance.now()) not to hand proposals over: the gate did not answer lately. */
    this.handoffPausedUntil = 0;
  }

  /**
   * @param {{event?: Event, action?: string, actionId?: string, eventId?: string}} [scope]
   */
  context(scope = {}) {
    /** @type {Record<string, unknown>} */
    const bound = {};
    const eventId = scope.event?.id ?? scope.eventId;
    if (eventId) bound.event_id = eventId;
    if (scope.action) bound.action = scope.action;
    if (scope.actionId) bound.action_id = scope.actionId;
    return new Context(this.plugin, this.subjects.host, this.log.bind(bound), this.config, this.nc, this.subjects, scope);
  }

  /** @param {Promise<unknown>} work */
  track(work) {
    this.inFlight.add(work);
    work.finally(() => this.inFlight.delete(work)).catch(() => {});
  }

  async start() {
    const p = this.plugin;
    for (const hook of p.startHooks) await hook(this.context());
    const svc = new Svcm(/** @type {any} */ (this.nc));
    this.service = await svc.add({
      name: p.name,
      version: p.manifest.version,
      description: (p.manifest.description ?? "").slice(0, 256),
      queue: p.name,
      metadata: {
        tuxpilot: "plugin",
        host: this.subjects.host,
        plugin: p.name,
        version: p.manifest.version,
        instance: this.instance,
        api_version: p.manifest.api_version ?? "1",
        // Who this instance really runs as, for `tuxpilot status`.
        user: currentUser(),
        pid: String(process.pid),
      },
      statsHandler: async (endpoint) => {
        const action = endpoint.subject.split(".").at(-1) ?? "";
        return { instance: this.instance, ...(this.counts[action] ?? {}) };
      },
    });
    for (const name of Object.keys(p.manifest.actions ?? {})) {
      if (!p.actions.has(name)) {
        this.log.warning("plugin.action_without_handler", { action: name });
        continue;
      }
      this.plugin.validator(name); // compiled now: a bad schema shows at start, not at the first call
      // Each action's contract is in the metadata of the gate's public endpoint, not here.
      this.service.addEndpoint(name, {
        subject: this.subjects.exec(p.name, name),
        handler: (err, msg) => {
          if (err) {
            this.log.warning("action.endpoint_error", { action: name, error: String(err) });
            return;
          }
          this.track(this.answer(msg, name));
        },
      });
    }
    // The framework stops the service when one of its subscriptions fails (say a permissions
    // violation): a plugin that cannot serve ends, and its host restarts it with backoff.
    this.service.stopped.then((err) => {
      if (err && !this.stopping) {
        this.log.error("plugin.service_failed", { error: String(err) });
        this.failed?.(err);
      }
    });
    if ((p.manifest.subscribes ?? []).length) this.pulling = this.consume();
    await this.nc.flush();
    this.log.info("plugin.started", { version: p.manifest.version, actions: [...p.actions.keys()].sort(), runtime: "javascript" });
  }

  async stop() {
    this.stopping = true;
    if (this.messages) await this.messages.close().catch(() => {});
    if (this.service) await this.service.stop().catch(() => {});
    if (this.pulling) await this.pulling.catch(() => {});
    // Work in flight gets a grace period; an event not acked by then is redelivered to another instance.
    await Promise.race([Promise.allSettled([...this.inFlight]), new Promise((r) => setTimeout(r, STOP_GRACE_MS).unref())]);
    for (const hook of this.plugin.stopHooks) {
      try {
        await hook(this.context());
      } catch (err) {
        this.log.exception("plugin.stop_hook_failed", err);
      }
    }
    this.log.info("plugin.stopped");
  }

  // -- events -------------------------------------------------------------------------------------

  /** Pull from the agent-created durable consumer; each event is handled concurrently, bounded by max_ack_pending. */
  async consume() {
    const stream = this.subjects.eventsStream;
    const name = pluginConsumerName(this.plugin.name, this.subjects.host);
    let consumer;
    for (let attempt = 0; !this.stopping; attempt++) {
      try {
        consumer = await this.js.consumers.get(stream, name);
        break;
      } catch (err) {
        // The agent creates the consumer from the manifest; a plugin may not. Wait for it.
        if (attempt % 30 === 0) this.log.warning("plugin.consumer_missing", { stream, consumer: name, error: String(err) });
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
    if (!consumer || this.stopping) return;
    const info = await consumer.info(true);
    const inFlight = Math.max(1, info.config.max_ack_pending ?? 1000);
    const eventSlots = new Slots(inFlight);
    this.messages = await consumer.consume({ max_messages: Math.min(inFlight, 256) });
    for await (const msg of this.messages) {
      await eventSlots.acquire();
      const work = this.onEvent(msg).finally(() => eventSlots.release());
      this.track(work);
    }
  }

  /**
   * Ack once the proposal is decided (handed over) or stored; a failing handler naks with the configured backoff; garbage is terminated.
   * @param {import("@nats-io/jetstream").JsMsg} msg
   */
  async onEvent(msg) {
    let event;
    try {
      event = parseEvent(msg.data);
    } catch (err) {
      this.log.warning("plugin.bad_event", { subject: msg.subject, error: String(/** @type {Error} */ (err).message).slice(0, 300) });
      msg.term(); // garbage never gets better by redelivery
      return;
    }
    try {
      await this.handleEvent(event);
    } catch (err) {
      const delay = redeliveryDelay(this.settings.backoffS, msg.info.deliveryCount);
      const fields = { event_id: event.id, type: event.type, retry_in_s: delay };
      if (isBusError(err)) {
        // The bus, not the handler: expected while the server restarts; one line, no stack.
        this.log.warning("plugin.event_deferred", { ...fields, error: `${/** @type {Error} */ (err).name}: ${/** @type {Error} */ (err).message}`.slice(0, 300) });
      } else {
        this.log.exception("plugin.event_failed", err, fields);
      }
      try {
        msg.nak(delay * 1000);
      } catch {
        // Unacked, it comes back after ack_wait anyway.
      }
      return;
    }
    msg.ack();
  }

  /**
   * Run the matching handlers and make their proposed actions one proposal, whose id (derived from
   * the event and the plugin) is its JetStream message id: a redelivered event's proposal is stored
   * once. It is handed to the gate by request first when the host allows it, and stored when the
   * gate does not take it. A failing handler throws.
   * @param {Event} event
   */
  async handleEvent(event) {
    const ctx = this.context({ event });
    /** @type {ProposedAction[]} */
    const actions = [];
    for (const [pattern, handler] of this.plugin.eventHandlers) {
      if (!matches(pattern, event.type)) continue;
      const got = await handler(event, ctx);
      if (got === null || got === undefined) continue;
      for (const item of Array.isArray(got) ? got : [got]) actions.push({ ...item, plugin: item.plugin ?? this.plugin.name });
    }
    if (!actions.length) return null;
    const proposal = {
      id: proposalId(event.id, this.plugin.name),
      event_id: event.id,
      plugin: this.plugin.name,
      time: new Date().toISOString(),
      event,
      actions,
    };
    const body = JSON.stringify(proposal);
    const handed = await this.handOver(body, proposal.id);
    if (!handed) {
      await this.js.publish(this.subjects.proposal(this.plugin.name), body, {
        msgID: proposal.id,
        timeout: this.settings.requestTimeoutMs,
      });
    }
    ctx.log.debug("plugin.proposed", { actions: actions.map((a) => a.action), proposal_id: proposal.id, handed });
    return proposal;
  }

  /**
   * Hand a proposal to the gate by request: true once the gate answers that it is decided (its
   * records stored). False when it cannot take it now (busy, the bus), does not answer in time or is
   * not there: then the proposal is stored, and the gate takes it from the stream.
   * @param {string} body the proposal document
   * @param {string} id the proposal id, its `Nats-Msg-Id` as when stored
   * @returns {Promise<boolean>}
   */
  async handOver(body, id) {
    const timeoutMs = this.settings.handoffTimeoutMs;
    if (!(timeoutMs > 0) || performance.now() < this.handoffPausedUntil) return false;
    const hdrs = headers();
    hdrs.set(MSG_ID_HEADER, id);
    let reply;
    try {
      reply = await this.nc.request(this.subjects.handoff(this.plugin.name), body, {
        timeout: Math.max(1, Math.ceil(timeoutMs)),
        headers: hdrs,
      });
    } catch (err) {
      if (err instanceof RequestError && err.isNoResponders()) {
        // No gate now (an agent restarting): stored, it is decided when it is back.
        this.handoffPausedUntil = performance.now() + HANDOFF_PAUSE_MS;
      } else if (err instanceof TimeoutError) {
        // A slow decision, or a subject this plugin may not publish on.
        this.handoffPausedUntil = performance.now() + HANDOFF_PAUSE_MS;
        this.log.warning("plugin.handoff_unanswered", { timeout_s: timeoutMs / 1000, paused_s: HANDOFF_PAUSE_MS / 1000 });
      }
      return false;
    }
    let answer;
    try {
      answer = JSON.parse(new TextDecoder().decode(reply.data));
    } catch {
      return false;
    }
    return answer !== null && typeof answer === "object" && !Array.isArray(answer) && Number.isInteger(answer.decided);
  }

  // -- actions ------------------------------------------------------------------------------------

  /**
   * @param {import("@nats-io/services").ServiceMsg} msg
   * @param {string} action
   */
  async answer(msg, action) {
    await this.slots.acquire();
    try {
      const given = msg.headers?.get(ACTION_ID_HEADER) || "";
      /** @type {Reply} */
      let reply;
      if (!given) {
        reply = await this.runAction(msg, action, randomBytes(16).toString("hex"));
      } else {
        // The gate re-sends a request whose reply a reconnect may have lost: the same action id gets
        // the first run's reply (or waits for it), never a second run. An id is one action's only.
        const known = this.replies.get(given);
        if (known && known.action !== action) {
          const err = new Conflict(`action id ${given} belongs to ${this.plugin.name}.${known.action}, not ${action}`);
          this.log.warning("action.id_reused", { action, action_id: given, first_action: known.action });
          reply = errorReply(err);
        } else if (known) {
          this.log.info("action.replayed", { action, action_id: given });
          reply = await known.reply;
        } else {
          const running = this.runAction(msg, action, given);
          this.replies.set(given, { action, reply: running });
          if (this.replies.size > REMEMBERED_REPLIES) {
            const oldest = this.replies.keys().next().value;
            if (oldest !== undefined) this.replies.delete(oldest);
          }
          reply = await running;
        }
      }
      const limit = this.nc.info?.max_payload ?? 1024 * 1024;
      if (reply.body.length > limit - 1024) {
        // A reply the server would refuse would leave the caller waiting for nothing.
        this.log.warning("action.reply_too_large", { action, bytes: reply.body.length });
        reply = errorReply(
          new PayloadTooLarge(`${action}'s reply is ${reply.body.length} bytes; the server takes at most ${limit}`),
        );
      }
      try {
        if (reply.error) msg.respondError(reply.error.status, reply.error.description, reply.body);
        else msg.respond(reply.body);
      } catch (err) {
        this.log.warning("action.reply_failed", { action, error: String(err) });
      }
    } finally {
      this.slots.release();
    }
  }

  /**
   * Validate, run, and build the reply: a `result` document, or an `error` one with micro headers.
   * @param {import("@nats-io/services").ServiceMsg} msg
   * @param {string} action
   * @param {string} actionId
   * @returns {Promise<Reply>}
   */
  async runAction(msg, action, actionId) {
    const started = performance.now();
    const eventId = msg.headers?.get(EVENT_ID_HEADER) || undefined;
    const ctx = this.context({ action, actionId, eventId });
    const stat = (this.counts[action] ??= { ok: 0, error: 0, ms_total: 0 });
    try {
      const validator = this.plugin.validator(action);
      const given = parseParams(msg.data);
      validator.check(given);
      const params = validator.withDefaults(given);
      const handler = /** @type {ActionHandler} */ (this.plugin.actions.get(action));
      const value = await handler(params, ctx);
      const result = value === undefined ? { status: "ok" } : { status: "ok", data: value };
      const body = new TextEncoder().encode(JSON.stringify(result));
      stat.ok += 1;
      ctx.log.debug("action.done", { status: "ok", ms: Math.round((performance.now() - started) * 100) / 100 });
      return { body };
    } catch (err) {
      // Every failure becomes an `error` reply; the plugin lives on.
      stat.error += 1;
      const doc = errorDoc(err);
      if (err instanceof TuxPilotError) ctx.log.info("action.refused", { code: doc.code, error: doc.message });
      else ctx.log.exception("action.failed", err);
      return errorReply(err);
    } finally {
      stat.ms_total += performance.now() - started;
    }
  }
}

/** @typedef {{body: Uint8Array, error?: {status: number, description: string}}} Reply */

/**
 * An `error` document, with the NATS micro error headers carrying the same code and message.
 * @param {unknown} err
 * @returns {Reply}
 */
function errorReply(err) {
  const doc = errorDoc(err);
  const description = doc.message.slice(0, 1000).replace(/[\r\n]/g, " ");
  return { body: new TextEncoder().encode(JSON.stringify(doc)), error: { status: errorStatus(err), description } };
}

/**
 * Whether a failure came from the bus (timeouts, no responders, a closed connection), not from a handler.
 * @param {unknown} err
 */
function isBusError(err) {
  const name = err instanceof Error ? err.name : "";
  return /Timeout|NoResponders|Connection|Closed|Draining|JetStream/i.test(name);
}
