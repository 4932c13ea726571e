// @ts-check
/**
 * prometheus: TuxPilot's figures for a Prometheus server to scrape, on `node:http` + prom-client.
 *
 * Events come through the plugin's durable consumer (each counted once, by type and severity);
 * results and host figures are read from this host's audit and metrics subjects, which the
 * manifest's `reads` lets its NATS user subscribe to. Custom metrics are declared in the
 * plugin's config (`[config.metrics.<name>]`) and changed by the `update_metrics` action.
 */

import { createServer } from "node:http";
import client from "prom-client";
import { ActionError, Plugin } from "@tuxpilot/sdk";

const plugin = Plugin.fromEnv();
const registry = new client.Registry();

// prom-client samples event-loop lag every 10 ms by default, ~0.9 % of a core at idle; once a
// second keeps the figure and costs ~0.03 %.
const EVENT_LOOP_PRECISION_MS = 1000;
client.collectDefaultMetrics({
  register: registry,
  prefix: "tuxpilot_prometheus_",
  eventLoopMonitoringPrecision: EVENT_LOOP_PRECISION_MS,
});

const events = new client.Counter({
  name: "tuxpilot_events_total",
  help: "Events seen on this host, by type and severity.",
  labelNames: ["host", "type", "severity"],
  registers: [registry],
});
const results = new client.Counter({
  name: "tuxpilot_results_total",
  help: "Outcomes the gate recorded (ok, error, refused, dry_run, ...), by plugin, action and status.",
  labelNames: ["host", "plugin", "action", "status"],
  registers: [registry],
});
const durations = new client.Histogram({
  name: "tuxpilot_action_duration_seconds",
  help: "How long executed actions took, as the gate measured them.",
  labelNames: ["host", "plugin", "action"],
  buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  registers: [registry],
});
/** @param {string} name @param {string} help @param {string[]} [labelNames] */
const gauge = (name, help, labelNames = []) =>
  new client.Gauge({ name, help, labelNames: ["host", ...labelNames], registers: [registry] });
const host = {
  cpu: gauge("tuxpilot_host_cpu_percent", "CPU use of the host, percent of all cores."),
  load: gauge("tuxpilot_host_load", "Load average.", ["period"]),
  memoryUsed: gauge("tuxpilot_host_memory_used_bytes", "Memory in use."),
  memoryTotal: gauge("tuxpilot_host_memory_total_bytes", "Memory installed."),
  memoryPercent: gauge("tuxpilot_host_memory_percent", "Memory in use, percent."),
  swapUsed: gauge("tuxpilot_host_swap_used_bytes", "Swap in use."),
  swapPercent: gauge("tuxpilot_host_swap_percent", "Swap in use, percent."),
  diskUsed: gauge("tuxpilot_host_disk_used_bytes", "Disk space in use, per mountpoint.", ["mountpoint"]),
  diskTotal: gauge("tuxpilot_host_disk_total_bytes", "Disk size, per mountpoint.", ["mountpoint"]),
  diskPercent: gauge("tuxpilot_host_disk_percent", "Disk space in use, percent, per mountpoint.", ["mountpoint"]),
  uptime: gauge("tuxpilot_host_uptime_seconds", "Seconds since the host booted."),
  gatePending: gauge("tuxpilot_gate_pending", "Proposals stored and not yet decided by the gate."),
  gateInFlight: gauge("tuxpilot_gate_in_flight", "Actions the gate is executing now."),
};

/** @typedef {{type: "counter" | "gauge" | "histogram", help?: string, labels?: string[], buckets?: number[]}} Declared */

/** @type {Map<string, {declared: Declared, metric: client.Counter | client.Gauge | client.Histogram}>} */
const custom = new Map();

/**
 * The custom metrics the plugin's config declares, registered once.
 * @param {Record<string, any>} config
 */
function declare(config) {
  for (const [name, declared] of Object.entries(/** @type {Record<string, Declared>} */ (config.metrics ?? {}))) {
    if (custom.has(name)) continue;
    const options = {
      name,
      help: declared.help ?? `${name} (declared in the prometheus plugin's config)`,
      labelNames: declared.labels ?? [],
      registers: [registry],
    };
    const metric =
      declared.type === "counter" ? new client.Counter(options)
        : declared.type === "gauge" ? new client.Gauge(options)
          : declared.type === "histogram" ? new client.Histogram({ ...options, ...(declared.buckets ? { buckets: declared.buckets } : {}) })
            : null;
    if (metric === null) throw new Error(`metric ${name}: type must be counter, gauge or histogram`);
    custom.set(name, { declared, metric });
  }
}

/** @type {import("node:http").Server | null} */
let server = null;
/** @type {{address: string, port: number} | null} */
let listening = null;

/**
 * @param {string} address
 * @param {number} port
 * @param {import("@tuxpilot/sdk").Context} ctx
 * @returns {Promise<{address: string, port: number}>}
 */
async function startServer(address, port, ctx) {
  if (server && listening) return listening;
  const created = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method !== "GET" || path !== "/metrics") {
      res.writeHead(path === "/metrics" ? 405 : 404, { "content-type": "text/plain" }).end("see /metrics\n");
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { "content-type": registry.contentType }).end(text),
      (err) => res.writeHead(500, { "content-type": "text/plain" }).end(`${err}\n`),
    );
  });
  created.keepAliveTimeout = 65_000; // Prometheus keeps its scrape connections open
  await new Promise((resolve, reject) => {
    created.once("error", reject);
    created.listen(port, address, () => resolve(undefined));
  }).catch((err) => {
    throw new ActionError(`cannot listen on ${address}:${port}: ${err.code ?? err.message}`, { code: "unavailable" });
  });
  const bound = /** @type {import("node:net").AddressInfo} */ (created.address());
  server = created;
  listening = { address: bound.address, port: bound.port };
  ctx.log.info("metrics.listening", listening);
  return listening;
}

async function stopServer() {
  const was = server;
  server = null;
  listening = null;
  if (was) {
    was.closeAllConnections();
    await new Promise((resolve) => was.close(() => resolve(undefined)));
  }
  return was !== null;
}

/** @param {Record<string, any>} m a metrics snapshot (schemas/metrics.json) */
function takeSnapshot(m) {
  const h = { host: m.host };
  host.cpu.set(h, m.cpu_percent);
  ["1m", "5m", "15m"].forEach((period, i) => host.load.set({ ...h, period }, m.load?.[i] ?? 0));
  host.memoryUsed.set(h, m.memory?.used ?? 0);
  host.memoryTotal.set(h, m.memory?.total ?? 0);
  host.memoryPercent.set(h, m.memory?.percent ?? 0);
  host.swapUsed.set(h, m.swap?.used ?? 0);
  host.swapPercent.set(h, m.swap?.percent ?? 0);
  for (const disk of m.disks ?? []) {
    const d = { ...h, mountpoint: disk.mountpoint };
    host.diskUsed.set(d, disk.used);
    host.diskTotal.set(d, disk.total);
    host.diskPercent.set(d, disk.percent);
  }
  if (typeof m.uptime_s === "number") host.uptime.set(h, m.uptime_s);
  if (m.gate && typeof m.gate.pending === "number") host.gatePending.set(h, m.gate.pending);
  if (m.gate && typeof m.gate.in_flight === "number") host.gateInFlight.set(h, m.gate.in_flight);
}

/** @param {Record<string, any>} r a result document (schemas/result.json) */
function takeResult(r) {
  if (!r.plugin || !r.action || !r.status) return;
  results.inc({ host: r.host ?? "", plugin: r.plugin, action: r.action, status: r.status });
  if (typeof r.duration_ms === "number" && (r.status === "ok" || r.status === "error")) {
    durations.observe({ host: r.host ?? "", plugin: r.plugin, action: r.action }, r.duration_ms / 1000);
  }
}

/**
 * Follow a subject for as long as the plugin runs; a message that is not JSON is skipped.
 * @param {import("@tuxpilot/sdk").Context} ctx
 * @param {string} subject
 * @param {(doc: Record<string, any>) => void} take
 */
function follow(ctx, subject, take) {
  ctx.nc.subscribe(subject, {
    callback: (err, msg) => {
      if (err) {
        ctx.log.warning("metrics.subscription_failed", { subject, error: String(err) });
        return;
      }
      try {
        take(msg.json());
      } catch (e) {
        ctx.log.debug("metrics.unreadable", { subject: msg.subject, error: String(e) });
      }
    },
  });
}

plugin.onStart(async (ctx) => {
  declare(ctx.config);
  follow(ctx, ctx.subjects.results(ctx.host), takeResult);
  follow(ctx, ctx.subjects.metrics(), takeSnapshot);
  if (ctx.config.autostart) await startServer(ctx.config.address, Number(ctx.config.port), ctx);
});

plugin.onStop(async () => {
  await stopServer();
});

plugin.on("*.*", (event) => {
  events.inc({ host: event.host, type: event.type, severity: event.severity });
});

plugin.action("start_metrics_server", async (params, ctx) => {
  const address = params.address ?? ctx.config.address;
  const port = params.port ?? Number(ctx.config.port);
  if (listening && (listening.port !== port && port !== 0)) {
    throw new ActionError(`already listening on ${listening.address}:${listening.port}; stop it first`, { code: "conflict" });
  }
  return { ...(await startServer(address, port, ctx)), path: "/metrics" };
});

plugin.action("stop_metrics_server", async (_params, ctx) => {
  const was = listening;
  const stopped = await stopServer();
  if (stopped) ctx.log.info("metrics.stopped", { ...was });
  return { stopped, ...(was ? { was } : {}) };
});

plugin.action("update_metrics", async (params) => {
  const found = custom.get(params.metric);
  if (!found) {
    const known = [...custom.keys()].sort().join(", ") || "none";
    throw new ActionError(`metric ${params.metric} is not declared in the plugin's config (declared: ${known})`, { code: "not_found" });
  }
  const { declared, metric } = found;
  const labels = /** @type {Record<string, string>} */ (params.labels ?? {});
  const allowed = new Set(declared.labels ?? []);
  const stray = Object.keys(labels).filter((l) => !allowed.has(l));
  if (stray.length) {
    throw new ActionError(`metric ${params.metric} has no label ${stray.join(", ")} (labels: ${[...allowed].join(", ") || "none"})`, { code: "invalid_params" });
  }
  const op = params.op ?? { counter: "inc", gauge: "set", histogram: "observe" }[declared.type];
  const value = Number(params.value ?? 1);
  if (declared.type === "counter" && op === "inc") {
    if (value < 0) throw new ActionError("a counter only goes up", { code: "invalid_params" });
    /** @type {client.Counter} */ (metric).inc(labels, value);
  } else if (declared.type === "gauge" && (op === "set" || op === "inc" || op === "dec")) {
    const g = /** @type {client.Gauge} */ (metric);
    if (op === "set") g.set(labels, value);
    else if (op === "inc") g.inc(labels, value);
    else g.dec(labels, value);
  } else if (declared.type === "histogram" && op === "observe") {
    /** @type {client.Histogram} */ (metric).observe(labels, value);
  } else {
    throw new ActionError(`a ${declared.type} cannot ${op}`, { code: "invalid_params" });
  }
  return { metric: params.metric, type: declared.type, op, value, labels };
});

plugin.action("export_metrics", async () => ({
  content_type: registry.contentType,
  text: await registry.metrics(),
}));

await plugin.run();
