#!/usr/bin/env bash
# A real Docker engine for the tests: `start` installs (Debian's docker.io), starts dockerd on its own
# socket without a system manager, and builds the local busybox image the tests run; `stop` ends it.
set -euo pipefail

SOCK=/tmp/tp-docker.sock
PIDFILE=/tmp/tp-docker.pid
IMAGE=tuxpilot-test-busybox:latest
export DOCKER_HOST="unix://$SOCK"

start() {
  if ! command -v dockerd >/dev/null || ! [ -x /bin/busybox ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io busybox-static >/dev/null
  fi
  if ! docker info >/dev/null 2>&1; then
    dockerd --host "$DOCKER_HOST" --data-root /tmp/tp-docker --exec-root /tmp/tp-docker-exec \
      --pidfile "$PIDFILE" --iptables=false --bridge=none >/tmp/tp-docker.log 2>&1 &
    for _ in $(seq 1 120); do
      docker info >/dev/null 2>&1 && break
      sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 /tmp/tp-docker.log; exit 1; }
  fi
  if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/etc"
    cp /bin/busybox "$rootfs/bin/busybox"
    for tool in $("$rootfs/bin/busybox" --list); do
      [ "$tool" = busybox ] || ln -sf busybox "$rootfs/bin/$tool"
    done
    tar -C "$rootfs" -c . | docker import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
  fi
  docker run --rm --network none "$IMAGE" /bin/sh -c 'echo engine ok' >/dev/null
  echo "export DOCKER_HOST=$DOCKER_HOST"
}

stop() {
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
