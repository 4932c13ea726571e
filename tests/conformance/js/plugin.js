// The conformance plugin in JavaScript: the behaviour ../plugin.toml describes, on the JS SDK.
import { ActionError, Plugin } from "@tuxpilot/sdk";

const plugin = Plugin.fromEnv();
/** @type {Map<string, number>} */
const runs = new Map();
/** @type {Map<string, number>} */
const deliveries = new Map();

/** Not a TuxPilot error: what a bug in a handler looks like. */
class Unexpected extends Error {}

plugin.action("echo", (params) => params);

plugin.action("count", (params) => {
  const n = (runs.get(params.key) ?? 0) + 1;
  runs.set(params.key, n);
  return { runs: n, key: params.key };
});

plugin.action("fail", (params) => {
  throw new ActionError(params.message, { code: params.code });
});

plugin.action("crash", () => {
  throw new Unexpected("crashed on request");
});

plugin.action("big", (params) => ({ blob: "x".repeat(params.bytes) }));

plugin.on("conformance.*", async (event, ctx) => {
  const delivery = (deliveries.get(event.id) ?? 0) + 1;
  deliveries.set(event.id, delivery);
  const name = event.type.split(".")[1];
  if (name === "quiet") return [];
  if (name === "flaky" && delivery <= Number(event.data?.fail ?? 0)) {
    throw new Unexpected(`failing delivery ${delivery} on request`);
  }
  if (name === "hold" && delivery === 1) {
    await new Promise((resolve) => setTimeout(resolve, Number(event.data?.hold_s ?? 0) * 1000));
  }
  return [ctx.propose("echo", { text: event.id, n: Math.min(delivery, 10) }, { reason: `delivery ${delivery}` })];
});

await plugin.run();
