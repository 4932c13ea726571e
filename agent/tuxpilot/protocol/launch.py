"""The launch environment: the `TUXPILOT_*` variables a host sets for a plugin process it starts, and the
credential file one of them names. The host (`runtimes/host.py`) writes them, every SDK reads them;
`docs/protocol.md` describes the same facts for SDKs in other languages.

Every settings key has an environment name derived from its path (`nats.url` is `TUXPILOT_NATS_URL`);
`env_name` is that rule, and the names below are the ones the host always sets.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "TUXPILOT_"


def env_name(*path: str) -> str:
    """The environment variable of the settings key at `path`: ("nats", "url") is TUXPILOT_NATS_URL."""
    return ENV_PREFIX + "_".join(path).upper()


# Set by the host for every plugin process.
PLUGIN = env_name("plugin")  # the plugin's name
PLUGINS = env_name("plugins")  # JSON: {"<plugin>": {"config": {...}}}, the plugin's own settings
CONFIG = env_name("config")  # the config file to read: /dev/null, a plugin reads none
HOST_ID = env_name("host_id")
SUBJECT_PREFIX = env_name("subject_prefix")
STATE_DIR = env_name("state_dir")
NATS_URL = env_name("nats", "url")  # comma-separated server URLs
NATS_USER_FILE = env_name("nats", "user_file")  # the plugin's credential file (below), under generated auth
LOG_LEVEL = env_name("log", "level")
LOG_FORMAT = env_name("log", "format")
# Set for plugins in languages that read no TOML (runtime javascript): the manifest, as JSON.
MANIFEST = env_name("manifest")
# runtime = "wasm" only, JSON [{"host": DIR, "guest": DIR, "write": bool}]: the directories the guest may see
SANDBOX_DIRS = env_name("sandbox_dirs")
# Seconds a plugin waits for the gate's answer to a proposal handed over by request (`Subjects.handoff`)
# before it stores the proposal instead; 0 or unset: it stores every proposal, as before handoffs.
HANDOFF_TIMEOUT = env_name("handoff_timeout_s")
# Variables the host sets itself, whatever the agent's own environment says.
HOST_SET = frozenset({PLUGIN, PLUGINS, CONFIG, HOST_ID, SUBJECT_PREFIX, STATE_DIR, NATS_URL, LOG_LEVEL, LOG_FORMAT,
                      MANIFEST, SANDBOX_DIRS, HANDOFF_TIMEOUT})

# Who the agent is on the bus: never passed on to a plugin.
AGENT_SECRETS = frozenset(env_name("nats", key) for key in ("user", "password", "token", "creds", "user_file"))
# Connection settings (keys of `nats`) a plugin shares with the agent; who it is (user, password…) it does not.
NATS_SHARED = ("connect_timeout_s", "reconnect_wait_s", "max_reconnect_attempts", "request_timeout_s",
               "pending_bytes", "tls_ca", "tls_cert", "tls_key")
# The `streams` section (TUXPILOT_STREAMS_*) is passed whole: ack_wait_s, max_deliver, backoff_s… are
# what the plugin's durable consumer and its nak delays follow.
STREAMS_SECTION = "streams"
# The agent's own variables a plugin process keeps; everything else is scrubbed.
KEEP_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "DOCKER_HOST")


class CredentialFile(BaseModel):
    """The JSON file `TUXPILOT_NATS_USER_FILE` names (mode 0600, owned by the plugin's user): who the
    process is on the bus. A client must connect with `inbox_prefix` as its reply-inbox prefix: the
    server lets each user subscribe only to replies under its own prefix."""

    model_config = ConfigDict(extra="ignore")  # newer hosts may add keys; old SDKs keep working

    user: str
    password: str
    inbox_prefix: str = Field(description="Reply subjects are `<inbox_prefix>.<token>`.")
    url: str | None = Field(None, description="Where the server listens, when the file was written with one.")
