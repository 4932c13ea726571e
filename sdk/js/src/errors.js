// @ts-check
/**
 * Errors as values on the wire and exceptions in code: the `error` document
 * (`{code, message, details?}`) and the numbers carried in the micro error header.
 * @module
 */

/** Error codes to the number in `Nats-Service-Error-Code`, as the protocol lists them. */
export const STATUS_CODES = Object.freeze({
  bad_request: 400,
  invalid_params: 400,
  invalid_config: 400,
  forbidden: 403,
  not_found: 404,
  unknown_plugin: 404,
  unknown_action: 404,
  conflict: 409,
  payload_too_large: 413,
  internal: 500,
  unavailable: 503,
  timeout: 504,
  resource_exhausted: 507,
  plugin_fault: 502,
  unhealthy: 502,
  package_refused: 422,
});

/**
 * @typedef {{code: string, message: string, details?: Record<string, unknown>}} ErrorDoc
 */

/** An error with a code that travels: raised in code, sent as an `error` document. */
export class TuxPilotError extends Error {
  /**
   * @param {string} message
   * @param {{code?: string, details?: Record<string, unknown>}} [options]
   */
  constructor(message, options = {}) {
    super(message);
    this.name = new.target.name;
    /** @type {string} */
    this.code = options.code ?? /** @type {typeof TuxPilotError} */ (new.target).defaultCode;
    /** @type {Record<string, unknown>} */
    this.details = options.details ?? {};
  }

  static defaultCode = "internal";

  /** The number carried in `Nats-Service-Error-Code`. */
  get status() {
    return /** @type {Record<string, number>} */ (STATUS_CODES)[this.code] ?? 500;
  }

  /** @returns {ErrorDoc} */
  toDoc() {
    /** @type {ErrorDoc} */
    const doc = { code: this.code, message: this.message };
    if (Object.keys(this.details).length) doc.details = this.details;
    return doc;
  }
}

/** Raised by an action handler: the caller gets an `error` document with this code and message. */
export class ActionError extends TuxPilotError {}

export class BadRequest extends TuxPilotError {
  static defaultCode = "bad_request";
}

export class InvalidParams extends TuxPilotError {
  static defaultCode = "invalid_params";
}

export class PayloadTooLarge extends TuxPilotError {
  static defaultCode = "payload_too_large";
}

export class Forbidden extends TuxPilotError {
  static defaultCode = "forbidden";
}

export class Conflict extends TuxPilotError {
  static defaultCode = "conflict";
}

export class ConfigError extends TuxPilotError {
  static defaultCode = "invalid_config";
}

/**
 * The `error` document for any thrown value; unexpected ones say only their type and message.
 * @param {unknown} err
 * @returns {ErrorDoc}
 */
export function errorDoc(err) {
  if (err instanceof TuxPilotError) return err.toDoc();
  const name = err instanceof Error ? err.constructor.name : typeof err;
  const text = err instanceof Error ? err.message : String(err);
  return { code: "internal", message: `${name}: ${text}`.slice(0, 4096) };
}

/**
 * The micro error number for any thrown value.
 * @param {unknown} err
 */
export function errorStatus(err) {
  return err instanceof TuxPilotError ? err.status : 500;
}
