"""Hand-written WAT guests of the TuxPilot wasm ABI: an echo guest and guests that misbehave on purpose."""

from __future__ import annotations

from pathlib import Path

import wasmtime

# Bump allocator from 128 KiB up; `tuxpilot_call` runs BODY, then echoes the request as {"ok": REQUEST}.
TEMPLATE = """
(module
  (memory (export "memory") {pages})
  (global $next (mut i32) (i32.const 131072))
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 1024) "{{\\"ok\\":")
  (func (export "tuxpilot_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $len)))
    (if (i32.gt_u (global.get $next) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (local.get $len) (i32.const 65536)) (i32.const 1))))))
    (local.get $p))
  (func (export "tuxpilot_call") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    {body}
    ;; reply = {{"ok": REQUEST}} at 64 KiB
    (local.set $out (i32.const 65536))
    (memory.copy (local.get $out) (i32.const 1024) (i32.const 6))
    (memory.copy (i32.add (local.get $out) (i32.const 6)) (local.get $ptr) (local.get $len))
    (i32.store8 (i32.add (local.get $out) (i32.add (local.get $len) (i32.const 6))) (i32.const 125))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 7))))))
"""

BODIES = {
    "echo": "",
    "loop": "(loop $l (br $l))",
    # grows its memory a MiB at a time until refused, then aborts as an allocator does
    "hog": "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable",
    "trap": "unreachable",
    "divide": "(drop (i32.div_u (i32.const 1) (i32.sub (local.get $len) (local.get $len))))",
    # answers a pointer far outside its 3 pages of memory
    "oob": "(return (i64.or (i64.shl (i64.const 0xFFFF0000) (i64.const 32)) (i64.const 100)))",
    # answers how many calls this instance has seen: {"ok": N} (1 unless state is kept)
    "counter": """
      (i32.store8 (i32.const 65536) (i32.const 123))
      (memory.copy (i32.const 65537) (i32.const 1025) (i32.const 5))
      (i32.store8 (i32.const 65542) (i32.add (i32.const 48) (global.get $count)))
      (i32.store8 (i32.const 65543) (i32.const 125))
      (return (i64.or (i64.shl (i64.const 65536) (i64.const 32)) (i64.const 8)))""",
}
# One guest for a whole plugin process: the action's first letter picks the behaviour. The host's request
# starts `{"kind": "action", "action": "NAME"`, so NAME's first byte is at offset 30.
BODIES["multi"] = "\n".join(
    f"(if (i32.eq (i32.load8_u (i32.add (local.get $ptr) (i32.const 30))) (i32.const {ord(letter)})) (then {body}))"
    for letter, body in (("l", BODIES["loop"]), ("h", BODIES["hog"]), ("t", BODIES["trap"]), ("o", BODIES["oob"]))
)


def build(kind: str, folder: Path, pages: int = 3) -> Path:
    path = folder / f"{kind}.wasm"
    path.write_bytes(wasmtime.wat2wasm(TEMPLATE.format(pages=pages, body=BODIES[kind])))
    return path
