// A test plugin: every handler the SDK offers, with what the tests need to observe.
import { ActionError, Plugin } from "../../../sdk/js/src/index.js";

const plugin = Plugin.fromEnv();
let calls = 0;
/** @type {Map<string, number>} */
const attempts = new Map();

plugin.on("demo.propose", async (event, ctx) => [ctx.propose("echo", { text: `seen ${event.id}` }, { reason: "demo" })]);
plugin.on("demo.fail", async (event) => {
  attempts.set(event.id, (attempts.get(event.id) ?? 0) + 1);
  throw new Error("this handler always fails");
});
plugin.on("demo.quiet", async () => null);

plugin.action("echo", async (params, ctx) => {
  ctx.log.info("echoing", { text: params.text });
  return { text: params.text, n: params.n, action_id: ctx.actionId };
});
plugin.action("count", async () => {
  calls += 1;
  await new Promise((r) => setTimeout(r, 200));
  return { calls };
});
plugin.action("big", async () => ({ blob: "x".repeat(2 * 1024 * 1024) }));
plugin.action("attempts", async (params) => {
  if (!attempts.has(params.event_id)) throw new ActionError(`no attempts for ${params.event_id}`, { code: "not_found" });
  return { attempts: attempts.get(params.event_id) };
});

await plugin.run();
