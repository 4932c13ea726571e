#!/bin/sh
# Builds plugin.wasm (the conformance plugin in C) with Debian's clang and wasi-libc.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all -I "$here/../../../guests/c" \
    -o "${1:-$here/plugin.wasm}" "$here/plugin.c"
