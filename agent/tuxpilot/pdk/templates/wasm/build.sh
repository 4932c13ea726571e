#!/bin/sh
# Builds plugin.wasm from plugin.c with Debian's clang and wasi-libc, offline:
#   apt-get install clang lld wasi-libc libclang-rt-dev-wasm32
set -eu
here=$(cd "$(dirname "$0")" && pwd)
${CC:-clang} --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all -I "$here/include" \
    -o "$here/plugin.wasm" "$here/plugin.c"
