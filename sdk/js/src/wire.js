// @ts-check
/**
 * Bytes from the wire to JSON documents, as strictly as the Python side reads them: UTF-8 only,
 * no lone surrogates, nesting capped, a size limit; anything else is a `bad_request`.
 * @module
 */

import { BadRequest, PayloadTooLarge } from "./errors.js";

export const MAX_DEPTH = 64;
export const MAX_PARAMS_BYTES = 256 * 1024;

const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false });
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/**
 * @param {Uint8Array} raw
 * @param {{what: string, limit: number}} options
 * @returns {unknown}
 */
export function parse(raw, { what, limit }) {
  if (raw.length > limit) throw new PayloadTooLarge(`${what} is ${raw.length} bytes; the limit is ${limit}`);
  let text;
  try {
    text = utf8.decode(raw); // a leading BOM is dropped, as the Python side allows it
  } catch {
    throw new BadRequest(`${what} is not UTF-8`);
  }
  let doc;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new BadRequest(`${what} is not valid JSON: ${String(/** @type {Error} */ (err).message).slice(0, 200)}`);
  }
  checkShape(doc, what);
  return doc;
}

/**
 * @param {unknown} doc
 * @param {string} what
 */
function checkShape(doc, what) {
  /** @type {[unknown, number][]} */
  const stack = [[doc, 1]];
  while (stack.length) {
    const [node, depth] = /** @type {[unknown, number]} */ (stack.pop());
    if (depth > MAX_DEPTH) throw new BadRequest(`${what} nests deeper than ${MAX_DEPTH} levels`);
    if (typeof node === "string") {
      checkText(node, what);
    } else if (Array.isArray(node)) {
      for (const item of node) stack.push([item, depth + 1]);
    } else if (node !== null && typeof node === "object") {
      for (const [key, value] of Object.entries(node)) {
        checkText(key, what);
        stack.push([value, depth + 1]);
      }
    }
  }
}

/**
 * @param {string} text
 * @param {string} what
 */
function checkText(text, what) {
  if (LONE_SURROGATE.test(text)) {
    throw new BadRequest(`${what} holds a string that is not valid Unicode (a lone surrogate)`);
  }
}

/**
 * A request body as action params: empty means no params; anything else must be a JSON object.
 * @param {Uint8Array} raw
 * @param {number} [limit]
 * @returns {Record<string, unknown>}
 */
export function parseParams(raw, limit = MAX_PARAMS_BYTES) {
  if (!new TextDecoder().decode(raw).trim()) return {};
  const doc = parse(raw, { what: "params", limit });
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    const kind = doc === null ? "null" : Array.isArray(doc) ? "array" : typeof doc;
    throw new BadRequest(`params must be a JSON object, not ${kind}`);
  }
  return /** @type {Record<string, unknown>} */ (doc);
}
