// @ts-check
// {{name}}'s event handler and action, apart from plugin.js so that the tests can call them in-process.
import { ActionError } from "@tuxpilot/sdk";

/**
 * @param {import("@tuxpilot/sdk").Plugin} plugin
 * @returns {import("@tuxpilot/sdk").Plugin}
 */
export function register(plugin) {
  // Must be in the manifest's `subscribes`. A proposal, not an action: the host's gate checks it first.
  plugin.on("{{event}}", async (event, ctx) => {
    const name = String(event.resource ?? event.host).slice(0, 64);
    return [ctx.propose("hello", { name }, { reason: `${event.type} at ${event.value}` })];
  });

  // Params arrive validated against plugin.toml, defaults filled.
  plugin.action("hello", async (params, ctx) => {
    if (params.name === "nobody") throw new ActionError("no one to greet", { code: "not_found" });
    ctx.log.info("greeting", { name: params.name });
    return { text: `hello ${params.name}` }; // -> {"status": "ok", "data": {...}}
  });
  return plugin;
}
