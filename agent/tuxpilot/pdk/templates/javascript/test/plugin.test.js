// {{name}}'s handlers, called in-process the way the SDK calls them (params checked, defaults filled).
// `tuxpilot plugin test` runs this with the manifest in TUXPILOT_MANIFEST, as the host hands it over.
import assert from "node:assert/strict";
import { test } from "node:test";
import { ActionError, Context, InvalidParams, Logger, Plugin } from "@tuxpilot/sdk";
import { register } from "../handlers.js";

const plugin = register(Plugin.fromEnv());
const log = new Logger({}, "error");

/** @param {Record<string, unknown>} [scope] */
function context(scope = {}) {
  // No connection: these handlers neither subscribe nor emit.
  return new Context(plugin, "test-host", log, {}, /** @type {any} */ (null), /** @type {any} */ (null), scope);
}

/** @param {string} action @param {Record<string, unknown>} [given] */
async function call(action, given = {}) {
  const validator = plugin.validator(action);
  validator.check(given);
  const handler = plugin.actions.get(action);
  assert.ok(handler, `no handler for ${action}`);
  return handler(validator.withDefaults(given), context({ action, actionId: "test" }));
}

test("hello fills the default", async () => {
  assert.deepEqual(await call("hello"), { text: "hello world" });
});

test("hello greets the name given", async () => {
  assert.deepEqual(await call("hello", { name: "ops" }), { text: "hello ops" });
});

test("hello refuses params its schema does not allow", async () => {
  await assert.rejects(call("hello", { name: 5 }), InvalidParams);
});

test("hello fails with its own error code", async () => {
  await assert.rejects(call("hello", { name: "nobody" }), (err) => err instanceof ActionError && err.code === "not_found");
});

test("the event proposes hello", async () => {
  const event = { id: "e1", type: "{{event}}", host: "test-host", resource: "web", value: 95 };
  const [[, handler]] = plugin.eventHandlers;
  const proposed = await handler(/** @type {any} */ (event), context({ event }));
  assert.deepEqual(proposed, [{ plugin: "{{name}}", action: "hello", params: { name: "web" }, reason: "{{event}} at 95", resource: "web" }]);
});
