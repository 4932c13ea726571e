// @ts-check
/**
 * Params validation against an action's declared JSON Schema (draft 2020-12), with ajv.
 * References are resolved only inside the document: ajv is given no way to load anything.
 * @module
 */

import Ajv2020Module from "ajv/dist/2020.js";
import { InvalidParams } from "./errors.js";

const Ajv2020 = /** @type {typeof import("ajv/dist/2020.js").default} */ (
  /** @type {unknown} */ (Ajv2020Module.default ?? Ajv2020Module)
);
const MAX_REPORTED = 10;

// strict: false accepts the annotations manifests carry (descriptions, examples, formats ajv
// does not know); allErrors reports up to MAX_REPORTED problems, as the Python side does.
const ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: false });

export class Validator {
  /**
   * @param {Record<string, unknown>} schema
   * @param {string} what e.g. "params of sysmon.top_processes"
   */
  constructor(schema, what) {
    this.what = what;
    this.schema = schema;
    this.validate = ajv.compile(schema);
  }

  /**
   * Raise InvalidParams naming every problem (up to ten).
   * @param {unknown} doc
   */
  check(doc) {
    if (this.validate(doc)) return;
    const problems = (this.validate.errors ?? []).slice(0, MAX_REPORTED).map((e) => ({
      path: e.instancePath || "/",
      message: e.message ?? "not valid",
    }));
    if (!problems.length) problems.push({ path: "/", message: "not valid" });
    const first = problems[0];
    throw new InvalidParams(`${this.what} is invalid at ${first.path}: ${first.message}`, {
      details: { errors: problems },
    });
  }

  /**
   * Fill the top-level defaults the schema declares, as authors expect of a schema.
   * @param {Record<string, unknown>} params
   * @returns {Record<string, unknown>}
   */
  withDefaults(params) {
    const props = /** @type {Record<string, any>} */ (this.schema.properties ?? {});
    /** @type {Record<string, unknown>} */
    const filled = {};
    for (const [key, spec] of Object.entries(props)) {
      if (spec && typeof spec === "object" && "default" in spec && !(key in params)) {
        filled[key] = structuredClone(spec.default);
      }
    }
    return Object.keys(filled).length ? { ...filled, ...params } : params;
  }
}
