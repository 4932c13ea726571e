"""The measurement behind the wasm ABI choice: one echo guest, written once for Extism's ABI and once for
TuxPilot's, called with the same ~100-byte JSON request; microseconds per call and the process's RSS.

    .venv/bin/pip install extism   # only for this comparison; TuxPilot does not depend on it
    .venv/bin/python benchmarks/wasm_abi.py
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuxpilot.sdk.wasm import Limits, Sandbox

from tests.wasm import guests

# Extism's ABI: input and output through its host functions; copies the input to the output.
EXTISM_ECHO = """
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u64" (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (memory (export "memory") 1)
  (func (export "echo") (result i32)
    (local $n i64) (local $i i64) (local $off i64)
    (local.set $n (call $input_length))
    (local.set $off (call $alloc (local.get $n)))
    (block $done (loop $words
      (br_if $done (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (local.get $n)))
      (call $store_u64 (i64.add (local.get $off) (local.get $i)) (call $input_load_u64 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 8)))
      (br $words)))
    (block $end (loop $bytes
      (br_if $end (i64.ge_u (local.get $i) (local.get $n)))
      (call $store_u8 (i64.add (local.get $off) (local.get $i)) (call $input_load_u8 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $bytes)))
    (call $output_set (local.get $off) (local.get $n))
    (i32.const 0)))
"""

REQUEST = json.dumps({"kind": "action", "action": "echo", "params": {"text": "hello", "n": 1},
                      "config": {}, "host": "bench-host", "action_id": "0" * 32}).encode()


def per_call_us(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    for _ in range(min(50, n)):
        call()  # type: ignore[operator]
    started = time.perf_counter()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter() - started) / n * 1e6


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = rss_mib()
        ours = Sandbox(guests.build("echo", Path(tmp)), Limits(memory_bytes=16 * 2**20))
        rows.append(("tuxpilot ABI, wasmtime, fresh instance per call", per_call_us(lambda: ours.call(REQUEST), 2000),
                     rss_mib() - base))
        kept = Sandbox(guests.build("echo", Path(tmp)), Limits(memory_bytes=16 * 2**20, keep_state=True))
        rows.append(("tuxpilot ABI, wasmtime, kept instance", per_call_us(lambda: kept.call(REQUEST), 2000),
                     rss_mib() - base))
        try:
            import extism
        except ImportError:
            print("extism is not installed: only TuxPilot's ABI measured")
        else:
            wasm = bytes(wasmtime.wat2wasm(EXTISM_ECHO))
            before = rss_mib()
            plugin = extism.Plugin(wasm, wasi=False)
            assert bytes(plugin.call("echo", REQUEST)) == REQUEST
            rows.append(("Extism ABI, kept instance", per_call_us(lambda: plugin.call("echo", REQUEST), 2000),
                         rss_mib() - before))

            def fresh() -> None:
                extism.Plugin(wasm, wasi=False).call("echo", REQUEST)

            rows.append(("Extism ABI, new plugin per call", per_call_us(fresh, 200), rss_mib() - before))
    print(f"{'host, instance handling':52} {'us/call':>9} {'RSS +MiB':>9}")
    for name, us, mib in rows:
        print(f"{name:52} {us:9.0f} {mib:9.1f}")
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
