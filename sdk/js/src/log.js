// @ts-check
/**
 * Structured logs as JSON lines on stderr, with the keys the Python side's JSON renderer writes
 * (`event`, `level`, `timestamp`, and the bound fields), so one collector reads both.
 * @module
 */

const LEVELS = /** @type {const} */ ({ debug: 10, info: 20, warning: 30, error: 40 });

/** @typedef {keyof typeof LEVELS} Level */

export class Logger {
  /**
   * @param {Record<string, unknown>} [fields] bound to every line
   * @param {Level} [level] the least level written
   * @param {(line: string) => void} [write]
   */
  constructor(fields = {}, level = "info", write = (line) => process.stderr.write(line)) {
    this.fields = fields;
    this.level = level;
    this.write = write;
  }

  /**
   * A logger carrying more fields.
   * @param {Record<string, unknown>} fields
   */
  bind(fields) {
    return new Logger({ ...this.fields, ...fields }, this.level, this.write);
  }

  /**
   * @param {Level} level
   * @param {string} event
   * @param {Record<string, unknown>} [fields]
   */
  log(level, event, fields = {}) {
    if (LEVELS[level] < LEVELS[this.level]) return;
    const doc = { ...this.fields, ...fields, event, level, timestamp: new Date().toISOString() };
    let line;
    try {
      line = JSON.stringify(doc, replacer);
    } catch {
      line = JSON.stringify({ ...this.fields, event, level, timestamp: doc.timestamp, unloggable: true });
    }
    this.write(line + "\n");
  }

  /** @param {string} event @param {Record<string, unknown>} [fields] */
  debug(event, fields) {
    this.log("debug", event, fields);
  }

  /** @param {string} event @param {Record<string, unknown>} [fields] */
  info(event, fields) {
    this.log("info", event, fields);
  }

  /** @param {string} event @param {Record<string, unknown>} [fields] */
  warning(event, fields) {
    this.log("warning", event, fields);
  }

  /** @param {string} event @param {Record<string, unknown>} [fields] */
  error(event, fields) {
    this.log("error", event, fields);
  }

  /**
   * An error line with the error's stack, as the Python side's `log.exception`.
   * @param {string} event
   * @param {unknown} err
   * @param {Record<string, unknown>} [fields]
   */
  exception(event, err, fields = {}) {
    const exception = err instanceof Error ? err.stack ?? String(err) : String(err);
    this.log("error", event, { ...fields, exception });
  }
}

/**
 * @param {string} _key
 * @param {unknown} value
 */
function replacer(_key, value) {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  return value;
}

/**
 * @param {string | undefined} name
 * @returns {Level}
 */
export function levelOf(name) {
  return name && name in LEVELS ? /** @type {Level} */ (name) : "info";
}
