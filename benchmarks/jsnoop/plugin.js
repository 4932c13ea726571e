// jsnoop: plugins/noop on the JavaScript SDK, so that benchmarks/js.py measures the SDK, not an action.
import { Plugin } from "../../sdk/js/src/index.js";

const plugin = Plugin.fromEnv();

plugin.on("bench.tick", (event, ctx) => {
  /** @type {Record<string, unknown>} */
  const params = { seq: Number(event.data?.seq ?? 0) };
  if (typeof event.value === "number") params.value = event.value;
  return [ctx.propose("echo", params, { reason: "bench tick" })];
});

plugin.action("echo", (params) => params);

await plugin.run();
