"""A local plugin's process, as the plugin host starts it: `python -m tuxpilot.sdk.process FOLDER`.

The same as `tuxpilot plugin run FOLDER`, without the command line around it: a plugin process
imports the SDK and its own code, not the CLI (typer, rich's tables) or the agent's gate and
monitor, which saves each plugin process ~5 MB and a tenth of a second at start.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tuxpilot.log import setup as setup_logging
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.sdk.plugin import load_plugin
from tuxpilot.sdk.settings import load_plugin_settings

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3  # as the `tuxpilot` command's


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tuxpilot.sdk.process FOLDER\n")
        return EXIT_USAGE
    try:
        config = load_plugin_settings()
        setup_logging(config.log.level, config.log.format)
        plugin = load_plugin(Path(argv[0]).resolve())
        asyncio.run(plugin.main(config))
    except ConfigError as exc:
        sys.stderr.write(f"{exc.message}\n")
        return EXIT_USAGE
    except TuxPilotError as exc:
        sys.stderr.write(f"{exc.message}\n")
        return EXIT_UNAVAILABLE if exc.code == "unavailable" else EXIT_FAILED
    except (OSError, ConnectionError) as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
