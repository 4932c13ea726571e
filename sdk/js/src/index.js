// @ts-check
/**
 * The TuxPilot plugin SDK for JavaScript. See plugin.js, and docs/protocol.md for the wire.
 * @module
 */

export { Context, Plugin, matches, parseEvent, redeliveryDelay } from "./plugin.js";
export {
  ActionError,
  BadRequest,
  ConfigError,
  Conflict,
  Forbidden,
  InvalidParams,
  PayloadTooLarge,
  STATUS_CODES,
  TuxPilotError,
  errorDoc,
} from "./errors.js";
export { Logger } from "./log.js";
export * as names from "./names.js";
export { Subjects } from "./names.js";
export { manifestFromEnv, settingsFromEnv } from "./settings.js";
