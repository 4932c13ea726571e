// The subset of the `nats` CLI the README's examples use (`req`, `sub`), written on the official NATS
// JavaScript client and nothing of TuxPilot's: it finds its server, user, password and inbox prefix in
// the `nats` CLI's own context files (--context NAME, else the selected one), as `nats` does.
//
//   node nats.mjs [--context NAME] [-s URL] req SUBJECT BODY [--replies N] [-r|--raw] [--timeout 5s]
//   node nats.mjs [--context NAME] [-s URL] sub SUBJECT [--count N] [--timeout 5s]
//
// Like `nats req`, a reply's headers go to stderr and its body to stdout, and "no responders" is a
// line on stderr with exit code 0.
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { connect, headers as natsHeaders } from "@nats-io/transport-node";

function configHome() {
  return join(process.env.XDG_CONFIG_HOME || join(process.env.HOME || homedir(), ".config"), "nats");
}

function loadContext(name) {
  const home = configHome();
  if (!name) {
    try {
      name = readFileSync(join(home, "context.txt"), "utf8").trim();
    } catch {
      return {};
    }
  }
  return JSON.parse(readFileSync(join(home, "context", `${name}.json`), "utf8"));
}

function seconds(text) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(text);
  if (!m) throw new Error(`bad duration ${text}`);
  const n = Number(m[1]);
  return m[2] === "ms" ? n / 1000 : m[2] === "m" ? n * 60 : n;
}

const args = process.argv.slice(2);
const opts = { context: undefined, server: undefined, replies: 1, raw: false, count: 0, timeout: 5 };
const positional = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === "--context") opts.context = args[++i];
  else if (a === "-s" || a === "--server") opts.server = args[++i];
  else if (a === "--replies") opts.replies = Number(args[++i]);
  else if (a === "-r" || a === "--raw") opts.raw = true;
  else if (a === "--count") opts.count = Number(args[++i]);
  else if (a === "--timeout") opts.timeout = seconds(args[++i]);
  else if (a === "-H" || a === "--header") (opts.headers ??= []).push(args[++i]);
  else positional.push(a);
}
const [verb, subject, body = ""] = positional;
const ctx = loadContext(opts.context);
const url = opts.server || ctx.url || "nats://127.0.0.1:4222";
const nc = await connect({
  servers: url.split(",").map((s) => s.trim()).filter(Boolean),
  user: ctx.user || undefined,
  pass: ctx.password || undefined,
  token: ctx.token || undefined,
  inboxPrefix: ctx.inbox_prefix || undefined,
  name: "nats.mjs",
});

function show(msg) {
  if (!opts.raw && msg.headers) {
    for (const [k, v] of msg.headers) process.stderr.write(`${k}: ${v.join(", ")}\n`);
  }
  process.stdout.write(msg.string() + "\n");
}

let code = 0;
try {
  if (verb === "req") {
    const hdrs = natsHeaders();
    for (const h of opts.headers ?? []) {
      const [k, ...v] = h.split(":");
      hdrs.append(k, v.join(":"));
    }
    if (opts.replies === 1) {
      try {
        show(await nc.request(subject, body, { timeout: opts.timeout * 1000, headers: hdrs }));
      } catch (err) {
        if (/no responders/i.test(String(err?.message ?? err)) || err?.code === "503") {
          process.stderr.write("No responders are available\n");
        } else {
          throw err;
        }
      }
    } else {
      // Scatter-gather as `nats req --replies N`: N replies, or every reply until the timeout when 0.
      const inbox = `${ctx.inbox_prefix || "_INBOX"}.${Math.random().toString(36).slice(2)}`;
      const sub = nc.subscribe(inbox, opts.replies > 0 ? { max: opts.replies } : {});
      const timer = setTimeout(() => sub.unsubscribe(), opts.timeout * 1000);
      nc.publish(subject, body, { reply: inbox, headers: hdrs });
      let seen = 0;
      for await (const msg of sub) {
        if (msg.headers && msg.headers.code === 503) break; // no responders
        seen++;
        show(msg);
      }
      clearTimeout(timer);
      if (seen === 0) process.stderr.write("No responders are available\n");
    }
  } else if (verb === "sub") {
    const sub = nc.subscribe(subject, opts.count > 0 ? { max: opts.count } : {});
    const timer = setTimeout(() => sub.unsubscribe(), opts.timeout * 1000);
    await nc.flush();
    process.stderr.write(`Subscribing on ${subject}\n`);
    for await (const msg of sub) {
      process.stdout.write(`[${msg.subject}] ${msg.string()}\n`);
    }
    clearTimeout(timer);
  } else {
    process.stderr.write(`unsupported: ${verb}\n`);
    code = 2;
  }
} catch (err) {
  process.stderr.write(`nats: error: ${err?.message ?? err}\n`);
  code = 1;
} finally {
  await nc.close();
}
process.exit(code);
