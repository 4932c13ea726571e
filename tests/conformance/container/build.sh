#!/bin/sh
# Builds the conformance plugin's image: TuxPilot's image (images/build.sh) + the Python implementation
# (../python). The image carries a manifest of its own only to say which file to import; the host runs
# it with the suite's manifest. Run in the plugin folder the suite made (its plugin.toml is the host's).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$here/../python/plugin.py" "$ctx/"
sed -e 's/^runtime = .*/runtime = "python"/' -e 's/^entry_point = .*/entry_point = "plugin.py"/' -e '/^image = /d' \
  plugin.toml >"$ctx/plugin.toml"
printf 'ARG BASE\nFROM ${BASE}\nCOPY plugin.toml plugin.py /plugin/\nCMD ["python3", "-m", "tuxpilot.sdk.process", "/plugin"]\n' \
  >"$ctx/Dockerfile"
base=${TUXPILOT_IMAGE:-tuxpilot:dev}
# The same inputs on the same base: the image there is the one this would build (each test asks again).
inputs=$( (docker image inspect -f '{{.Id}}' "$base"; cat "$ctx/plugin.toml" "$ctx/plugin.py") | sha256sum | cut -c1-64)
if [ "$(docker image inspect -f '{{index .Config.Labels "org.tuxpilot.inputs"}}' "$1" 2>/dev/null)" = "$inputs" ]; then
  exit 0
fi
docker build -q --network none --label "org.tuxpilot.inputs=$inputs" --build-arg "BASE=$base" -t "$1" "$ctx" >/dev/null
