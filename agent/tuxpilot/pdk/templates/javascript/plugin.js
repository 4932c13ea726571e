// {{description}}
// The process the host starts: the manifest arrives as JSON in TUXPILOT_MANIFEST; the handlers are in handlers.js.
import { Plugin } from "@tuxpilot/sdk";
import { register } from "./handlers.js";

const plugin = register(Plugin.fromEnv());
await plugin.run(); // until SIGTERM/SIGINT, then a clean stop
