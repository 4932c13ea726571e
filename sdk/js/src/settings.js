// @ts-check
/**
 * What a plugin process is told by its host: the launch environment (`TUXPILOT_*` variables, the
 * credential file, the manifest as JSON). The names are those the Python side reads (see
 * docs/protocol.md, "Launch environment"); a plugin reads no config file.
 * @module
 */

import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { ConfigError } from "./errors.js";
import { MANIFEST_ENV } from "./names.js";

/**
 * @typedef {object} Manifest
 * @property {string} name
 * @property {string} version
 * @property {string} description
 * @property {string} runtime
 * @property {string} [api_version]
 * @property {string[]} [subscribes]
 * @property {string[]} [emits]
 * @property {string[]} [permissions]
 * @property {Record<string, ActionSpec>} [actions]
 * @property {Record<string, unknown>} [config]
 */

/**
 * @typedef {object} ActionSpec
 * @property {string} [description]
 * @property {string | null} [permission]
 * @property {Record<string, unknown>} [params]
 * @property {number | null} [timeout_s]
 */

/**
 * @typedef {object} Settings
 * @property {string[]} servers
 * @property {string | undefined} user
 * @property {string | undefined} password
 * @property {string | undefined} token
 * @property {string | undefined} inboxPrefix
 * @property {{caFile?: string, certFile?: string, keyFile?: string} | undefined} tls
 * @property {number} connectTimeoutMs
 * @property {number} reconnectWaitMs
 * @property {number} maxReconnectAttempts
 * @property {number} requestTimeoutMs
 * @property {number} handoffTimeoutMs how long to wait for the gate to decide a proposal handed over by
 *   request; 0: never hand over, store every proposal
 * @property {string} hostId
 * @property {string} subjectPrefix
 * @property {number[]} backoffS redelivery delays after failures
 * @property {import("./log.js").Level} logLevel
 * @property {Record<string, unknown>} config the plugin's own settings from the host
 */

/**
 * @param {string | undefined} text
 * @param {string} name
 * @returns {unknown}
 */
function json(text, name) {
  if (text === undefined || text === "") return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${name} is not valid JSON: ${/** @type {Error} */ (err).message}`);
  }
}

/**
 * @param {Record<string, string | undefined>} env
 * @param {string} name
 * @param {number} fallback
 */
function number(env, name, fallback) {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new ConfigError(`${name}=${raw} is not a number`);
  return value;
}

/**
 * A number of seconds from the environment as milliseconds; anything else (unset, not a number,
 * negative) is 0, as the Python SDK reads it.
 * @param {Record<string, string | undefined>} env
 * @param {string} name
 */
function seconds(env, name) {
  const value = Number(env[name] || 0);
  return Number.isFinite(value) && value > 0 ? value * 1000 : 0;
}

/** The short host name made a subject token, as the Python side's default host id. */
export function defaultHostId() {
  const token = hostname().split(".")[0].trim().toLowerCase().replace(/[^a-z0-9_-]+/g, "-").replace(/^-+|-+$/g, "");
  return token.slice(0, 64) || "localhost";
}

/**
 * The manifest the host handed over in the environment.
 * @param {Record<string, string | undefined>} [env]
 * @returns {Manifest}
 */
export function manifestFromEnv(env = process.env) {
  const doc = json(env[MANIFEST_ENV], MANIFEST_ENV);
  if (doc === undefined) {
    throw new ConfigError(
      `${MANIFEST_ENV} is not set: start this plugin with \`tuxpilot plugin run FOLDER\` or from the agent's run_plugins`,
    );
  }
  if (!doc || typeof doc !== "object" || typeof (/** @type {any} */ (doc).name) !== "string") {
    throw new ConfigError(`${MANIFEST_ENV} is not a plugin manifest`);
  }
  return /** @type {Manifest} */ (doc);
}

/**
 * @param {string} plugin
 * @param {Record<string, string | undefined>} [env]
 * @returns {Settings}
 */
export function settingsFromEnv(plugin, env = process.env) {
  const servers = (env.TUXPILOT_NATS_URL ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  if (!servers.length) throw new ConfigError("no NATS server: set TUXPILOT_NATS_URL or start `tuxpilot up`");
  let user = env.TUXPILOT_NATS_USER || undefined;
  let password = env.TUXPILOT_NATS_PASSWORD || undefined;
  let inboxPrefix;
  if (env.TUXPILOT_NATS_USER_FILE) {
    let doc;
    try {
      doc = JSON.parse(readFileSync(env.TUXPILOT_NATS_USER_FILE, "utf8"));
    } catch (err) {
      throw new ConfigError(`credential file ${env.TUXPILOT_NATS_USER_FILE}: ${/** @type {Error} */ (err).message}`);
    }
    user = doc.user;
    password = doc.password;
    inboxPrefix = doc.inbox_prefix;
  }
  const tls = env.TUXPILOT_NATS_TLS_CA || env.TUXPILOT_NATS_TLS_CERT
    ? {
        ...(env.TUXPILOT_NATS_TLS_CA ? { caFile: env.TUXPILOT_NATS_TLS_CA } : {}),
        ...(env.TUXPILOT_NATS_TLS_CERT ? { certFile: env.TUXPILOT_NATS_TLS_CERT } : {}),
        ...(env.TUXPILOT_NATS_TLS_KEY ? { keyFile: env.TUXPILOT_NATS_TLS_KEY } : {}),
      }
    : undefined;
  const plugins = /** @type {Record<string, {config?: Record<string, unknown>}> | undefined} */ (
    json(env.TUXPILOT_PLUGINS, "TUXPILOT_PLUGINS")
  );
  const backoff = json(env.TUXPILOT_STREAMS_BACKOFF_S, "TUXPILOT_STREAMS_BACKOFF_S");
  return {
    servers,
    user,
    password,
    token: env.TUXPILOT_NATS_TOKEN || undefined,
    inboxPrefix,
    tls,
    connectTimeoutMs: number(env, "TUXPILOT_NATS_CONNECT_TIMEOUT_S", 2) * 1000,
    reconnectWaitMs: number(env, "TUXPILOT_NATS_RECONNECT_WAIT_S", 1) * 1000,
    maxReconnectAttempts: number(env, "TUXPILOT_NATS_MAX_RECONNECT_ATTEMPTS", -1),
    requestTimeoutMs: number(env, "TUXPILOT_NATS_REQUEST_TIMEOUT_S", 5) * 1000,
    handoffTimeoutMs: seconds(env, "TUXPILOT_HANDOFF_TIMEOUT_S"),
    hostId: env.TUXPILOT_HOST_ID || defaultHostId(),
    subjectPrefix: env.TUXPILOT_SUBJECT_PREFIX || "tuxpilot",
    backoffS: Array.isArray(backoff) ? backoff.map(Number) : [1, 5, 15, 30],
    logLevel: /** @type {import("./log.js").Level} */ (
      ["debug", "info", "warning", "error"].includes(env.TUXPILOT_LOG_LEVEL ?? "") ? env.TUXPILOT_LOG_LEVEL : "info"
    ),
    config: plugins?.[plugin]?.config ?? {},
  };
}
