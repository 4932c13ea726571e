#!/bin/sh
# Builds the conformance plugin's image from one implementation: `build.sh python TAG` puts ../python on
# TuxPilot's image, `build.sh js TAG` puts ../js (with its production node_modules) on the node image
# (images/build.sh makes both). The image carries a manifest of its own only to say which file to
# import; the host runs it with the suite's manifest. Run in the plugin folder the suite made (its
# plugin.toml is the host's).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
kind=$1 tag=$2
ctx=$(mktemp -d)
trap 'rm -rf "$ctx" "$ctx.files"' EXIT
case "$kind" in
  python)
    base=${TUXPILOT_IMAGE:-tuxpilot:dev}
    cp "$here/../python/plugin.py" "$ctx/"
    sed -e 's/^runtime = .*/runtime = "python"/' -e 's/^entry_point = .*/entry_point = "plugin.py"/' -e '/^image = /d' \
      plugin.toml >"$ctx/plugin.toml"
    printf 'ARG BASE\nFROM ${BASE}\nCOPY plugin.toml plugin.py /plugin/\nCMD ["python3", "-m", "tuxpilot.sdk.process", "/plugin"]\n' \
      >"$ctx/Dockerfile"
    ;;
  js)
    base=${TUXPILOT_NODE_IMAGE:-tuxpilot-node:dev}
    mkdir "$ctx/plugin"
    cp "$here/../js/plugin.js" "$here/../js/package.json" "$here/../js/package-lock.json" "$here/../js/.npmrc" "$ctx/plugin/"
    cp -r "$here/../../../sdk/js" "$ctx/plugin/sdk"
    rm -rf "$ctx/plugin/sdk/node_modules"
    printf 'ARG BASE\nFROM ${BASE}\nCOPY plugin /plugin\nCMD ["node", "/plugin/plugin.js"]\n' >"$ctx/Dockerfile"
    ;;
  *) echo "usage: $0 python|js TAG" >&2; exit 2 ;;
esac
# The same inputs on the same base: the image there is the one this would build (each test asks again).
inputs=$( (docker image inspect -f '{{.Id}}' "$base"; cat "$0"; cd "$ctx" && find . -type f | LC_ALL=C sort >"$ctx.files" \
  && cat "$ctx.files" && xargs cat <"$ctx.files") | sha256sum | cut -c1-64)
if [ "$(docker image inspect -f '{{index .Config.Labels "org.tuxpilot.inputs"}}' "$tag" 2>/dev/null)" = "$inputs" ]; then
  exit 0
fi
if [ "$kind" = js ]; then  # production dependencies only, no install scripts (as the host installs them)
  (cd "$ctx/plugin" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
fi
docker build -q --network none --label "org.tuxpilot.inputs=$inputs" --build-arg "BASE=$base" -t "$tag" "$ctx" >/dev/null
