#!/bin/sh
# Builds diskpolicy.wasm from src/ with Debian's Rust toolchain, offline (guests/rust/offline.toml):
#   apt-get install rustc cargo libstd-rust-dev-wasm32 librust-serde-json-dev
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
RUSTC=${RUSTC:-/usr/bin/rustc} ${CARGO:-/usr/bin/cargo} --config "$here/../../guests/rust/offline.toml" \
    build --offline --release --target-dir "${CARGO_TARGET_DIR:-$here/target}"
cp "${CARGO_TARGET_DIR:-$here/target}/wasm32-unknown-unknown/release/diskpolicy.wasm" "$here/diskpolicy.wasm"
