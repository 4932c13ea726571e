#!/bin/sh
# whoami: writes its uid and groups, and whether its credential file is readable, into its working
# dir; then becomes `sleep`, so the plugin's pid stays the process a test inspects.
id -u > uid.tmp && mv uid.tmp uid
id -G > groups
if cat "$TUXPILOT_NATS_USER_FILE" > /dev/null 2>&1; then echo yes > credentials; else echo no > credentials; fi
exec sleep 600
