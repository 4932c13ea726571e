"""A WebAssembly plugin's process: `python -m tuxpilot.sdk.wasm FOLDER`.

The guest (the manifest's `entry_point`, a `.wasm` module) is run by wasmtime inside this process; the
process itself is an ordinary SDK plugin (`Plugin`), so subjects, headers, replies, proposals and
redelivery are the SDK's, byte for byte, whatever language the guest was written in.

The ABI (docs/protocol.md, "WebAssembly plugins"), version 1: the guest exports `memory`,
`tuxpilot_alloc(len: i32) -> i32` and `tuxpilot_call(ptr: i32, len: i32) -> i64`. The host allocates
room for one JSON request, writes it, calls, and reads the JSON reply at `(ret >> 32, ret & 0xffffffff)`.

The sandbox, from the manifest and the host's grants:
- each call gets a fresh instance (no state survives a call) unless `[config] sandbox_keep_state`;
- memory is capped at `limits.memory_mb` (Store limits), a call's time at its action's `timeout_s`
  (epoch deadline), its instructions at `limits.cpu_s` worth of fuel when set;
- WASI only as far as the guest imports it, with no arguments, no environment, no stdin, output
  discarded, and a directory only where the host lists it in TUXPILOT_SANDBOX_DIRS (which it does
  only for a granted filesystem permission; read-only unless filesystem_write is granted);
- no network and no commands: the guest gets no socket and no host function that runs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import wasmtime

from tuxpilot.log import setup as setup_logging
from tuxpilot.protocol import launch
from tuxpilot.protocol.errors import ConfigError, TuxPilotError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.models import Event, ProposedAction
from tuxpilot.sdk.plugin import ActionError, Context, Plugin
from tuxpilot.sdk.settings import load_plugin_settings

ABI_VERSION = 1
ALLOC_EXPORT, CALL_EXPORT, MEMORY_EXPORT = "tuxpilot_alloc", "tuxpilot_call", "memory"
# What the host passes: the directories a granted filesystem permission opens, as JSON
# [{"host": "/var/log", "guest": "/var/log", "write": false}].
DIRS_ENV = launch.SANDBOX_DIRS
KEEP_STATE_KEY = "sandbox_keep_state"  # [config] key by which a manifest opts into one long-lived instance

EPOCH_TICK_S = 0.01
DEFAULT_MEMORY_MB = 64
DEFAULT_TIMEOUT_S = 10.0
# Fuel is counted in wasm instructions; ~5e8 simple ones run per CPU second here (measured on a
# counting loop), so cpu_s caps one call near that much CPU time.
FUEL_PER_CPU_S = 500_000_000
MAX_REPLY_BYTES = 8 * 1024 * 1024
WASM_PAGE = 65536

log = structlog.get_logger("tuxpilot.wasm")


class GuestTimeout(TuxPilotError):
    code = "timeout"


class ResourceExhausted(TuxPilotError):
    code = "resource_exhausted"


class PluginFault(TuxPilotError):
    code = "plugin_fault"


@dataclass(frozen=True)
class Preopen:
    host: Path
    guest: str
    write: bool = False


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = DEFAULT_MEMORY_MB * 1024 * 1024
    fuel: int | None = None
    dirs: tuple[Preopen, ...] = ()
    keep_state: bool = False

    @classmethod
    def of(cls, manifest: Manifest, dirs: tuple[Preopen, ...] = (), config: dict[str, Any] | None = None) -> Limits:
        lim = manifest.limits
        memory_mb = lim.memory_mb if lim is not None and lim.memory_mb is not None else DEFAULT_MEMORY_MB
        fuel = lim.cpu_s * FUEL_PER_CPU_S if lim is not None and lim.cpu_s is not None else None
        merged = {**manifest.config, **(config or {})}
        return cls(memory_mb * 1024 * 1024, fuel, dirs, merged.get(KEEP_STATE_KEY) is True)


def dirs_from_env(environ: dict[str, str] | None = None) -> tuple[Preopen, ...]:
    raw = (environ if environ is not None else os.environ).get(DIRS_ENV)
    if not raw:
        return ()
    try:
        return tuple(Preopen(Path(d["host"]), str(d.get("guest") or d["host"]), d.get("write") is True)
                     for d in json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{DIRS_ENV} is not a list of {{host, guest, write}}: {exc}") from exc


def _engine_config(limits: Limits) -> tuple[wasmtime.Config, str]:
    """The engine's config, and a text of every setting that changes compiled code (the cache key's part)."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.consume_fuel = limits.fuel is not None
    # A memory reserves 4 GiB of address space by default; the cap is far below, and a smaller
    # reservation made a fresh instance ~80 us cheaper.
    reservation = max(limits.memory_bytes, 16 * WASM_PAGE)
    config.memory_reservation = reservation
    return config, f"epoch=1;fuel={int(limits.fuel is not None)};reservation={reservation}"


def _engine_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


class Sandbox:
    """One compiled guest module and the limits it runs under. Thread-safe: each call has its own Store
    (or, with keep_state, calls take turns on one instance)."""

    def __init__(self, wasm: Path, limits: Limits, cache_dir: Path | None = None):
        self.wasm = wasm
        self.limits = limits
        config, settings = _engine_config(limits)
        self.engine = wasmtime.Engine(config)
        self.cache_key = hashlib.sha256(
            f"wasmtime {_engine_version()};{settings};".encode() + wasm.read_bytes()
        ).hexdigest()
        self.cache_hit = False
        self.module = self._load(wasm, cache_dir)
        self.uses_wasi = any(i.module.startswith("wasi_") for i in self.module.imports)
        self.linker = wasmtime.Linker(self.engine)
        if self.uses_wasi:
            self.linker.define_wasi()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()
        self._kept: tuple[wasmtime.Store, wasmtime.Instance] | None = None
        self._lock = threading.Lock()

    def _load(self, wasm: Path, cache_dir: Path | None) -> wasmtime.Module:
        cached = cache_dir / f"{self.cache_key}.cwasm" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            with contextlib.suppress(wasmtime.WasmtimeError):
                module = wasmtime.Module.deserialize_file(self.engine, str(cached))
                self.cache_hit = True
                return module
        try:
            module = wasmtime.Module.from_file(self.engine, str(wasm))
        except wasmtime.WasmtimeError as exc:
            raise ConfigError(f"{wasm}: not a WebAssembly module wasmtime compiles: {str(exc)[:300]}") from exc
        names = {e.name for e in module.exports}
        missing = {ALLOC_EXPORT, CALL_EXPORT, MEMORY_EXPORT} - names
        if missing:
            raise ConfigError(f"{wasm}: does not export {', '.join(sorted(missing))} (TuxPilot wasm ABI {ABI_VERSION})")
        if cached is not None:
            with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next start time
                cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(module.serialize())
                os.replace(tmp, cached)
        return module

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()

    def close(self) -> None:
        self._stop.set()

    def _instantiate(self) -> tuple[wasmtime.Store, wasmtime.Instance]:
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=self.limits.memory_bytes, instances=1, memories=1, tables=4)
        if self.uses_wasi:
            wasi = wasmtime.WasiConfig()  # no argv, no env, no stdin; stdout/stderr go nowhere
            for d in self.limits.dirs:
                wasi.preopen_dir(str(d.host), d.guest, d.write)
            store.set_wasi(wasi)
        self._arm(store, DEFAULT_TIMEOUT_S)
        try:
            instance = self.linker.instantiate(store, self.module)
            init = instance.exports(store).get("_initialize")
            if isinstance(init, wasmtime.Func):  # a WASI reactor (C, Rust on wasm32-wasi) sets up libc here
                init(store)
            return store, instance
        except wasmtime.Trap as exc:
            raise self._fault(exc, store, None) from exc
        except wasmtime.WasmtimeError as exc:
            if "memory" in str(exc) and "limit" in str(exc):
                raise ResourceExhausted(f"the guest's initial memory is over its cap: {str(exc)[:200]}") from exc
            raise PluginFault(f"the guest cannot be instantiated: {str(exc)[:300]}") from exc

    def _arm(self, store: wasmtime.Store, timeout_s: float) -> None:
        store.set_epoch_deadline(max(1, int(timeout_s / EPOCH_TICK_S) + 1))
        if self.limits.fuel is not None:
            store.set_fuel(self.limits.fuel)

    def call(self, request: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        """Run one request through the guest: its reply's bytes, or a TuxPilotError saying what went wrong."""
        if not self.limits.keep_state:
            store, instance = self._instantiate()
            return self._run(store, instance, request, timeout_s)
        with self._lock:
            if self._kept is None:
                self._kept = self._instantiate()
            store, instance = self._kept
            try:
                return self._run(store, instance, request, timeout_s)
            except (GuestTimeout, ResourceExhausted, PluginFault):
                self._kept = None  # a faulted instance is in no known state: the next call starts afresh
                raise

    def _run(self, store: wasmtime.Store, instance: wasmtime.Instance, request: bytes, timeout_s: float) -> bytes:
        exports = instance.exports(store)
        memory, alloc, call = exports[MEMORY_EXPORT], exports[ALLOC_EXPORT], exports[CALL_EXPORT]
        if not (isinstance(memory, wasmtime.Memory) and isinstance(alloc, wasmtime.Func)
                and isinstance(call, wasmtime.Func)):
            raise PluginFault("the guest's memory/tuxpilot_alloc/tuxpilot_call exports are of the wrong kind")
        self._arm(store, timeout_s)
        started = time.monotonic()
        try:
            ptr = alloc(store, len(request))
            if not isinstance(ptr, int) or ptr < 0 or ptr + len(request) > memory.data_len(store):
                raise PluginFault(f"tuxpilot_alloc returned {ptr!r}, outside the guest's memory")
            memory.write(store, request, ptr)
            packed = call(store, ptr, len(request))
        except wasmtime.Trap as exc:
            raise self._fault(exc, store, memory, timeout_s, started) from exc
        except wasmtime.WasmtimeError as exc:
            raise PluginFault(f"the guest failed: {str(exc)[:300]}") from exc
        if not isinstance(packed, int):
            raise PluginFault("tuxpilot_call returned no i64")
        out_ptr, out_len = (packed >> 32) & 0xFFFFFFFF, packed & 0xFFFFFFFF
        if out_len > MAX_REPLY_BYTES:
            raise PluginFault(f"the guest's reply is {out_len} bytes; at most {MAX_REPLY_BYTES} are read")
        if out_ptr + out_len > memory.data_len(store):
            raise PluginFault(
                f"the guest's reply ({out_ptr}+{out_len}) lies outside its memory ({memory.data_len(store)} bytes)"
            )
        return bytes(memory.read(store, out_ptr, out_ptr + out_len))

    def _fault(self, exc: wasmtime.Trap, store: wasmtime.Store, memory: wasmtime.Memory | None,
               timeout_s: float = DEFAULT_TIMEOUT_S, started: float | None = None) -> TuxPilotError:
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            return GuestTimeout(f"the guest ran past its {timeout_s:g} s deadline and was stopped")
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return ResourceExhausted(f"the guest used up its fuel ({self.limits.fuel} instructions, from cpu_s)")
        used = memory.data_len(store) if memory is not None else 0
        cap = self.limits.memory_bytes
        # A failed memory.grow returns -1 and does not trap; the guest's allocator then aborts
        # (`unreachable`). A trap with the memory over half its cap is taken as running out of it:
        # doubling allocators fail when about half is in use.
        if code in (wasmtime.TrapCode.UNREACHABLE, None) and used * 2 >= cap:
            return ResourceExhausted(
                f"the guest trapped with {used // 1024} KiB of its {cap // 1024} KiB memory cap in use "
                "(out of memory)"
            )
        what = code.name.lower().replace("_", " ") if code is not None else "a trap"
        return PluginFault(f"the guest trapped: {what}")


def _reply(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise PluginFault(f"the guest's reply is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PluginFault(f"the guest's reply is a JSON {type(doc).__name__}, not an object")
    return doc


def guest_plugin(folder: Path, manifest: Manifest, sandbox: Sandbox) -> Plugin:
    """An SDK plugin whose actions and event handler are the guest's."""
    plugin = Plugin(manifest, folder)
    for name, spec in manifest.actions.items():
        plugin.action(name)(_action(sandbox, name, spec.timeout_s or DEFAULT_TIMEOUT_S))
    handle = _on_event(sandbox)
    for i, pattern in enumerate(manifest.subscribes):
        # One handler per subscribed pattern, each skipping events an earlier pattern already took: an
        # event matching two patterns reaches the guest once.
        earlier = manifest.subscribes[:i]
        plugin.on(pattern)(_first_match(handle, earlier))
    return plugin


def _first_match(handle: Any, earlier: list[str]) -> Any:
    def run(event: Event, ctx: Context) -> list[ProposedAction]:
        if any(fnmatch.fnmatchcase(event.type, p) for p in earlier):
            return []
        return handle(event, ctx)  # type: ignore[no-any-return]

    return run


def _action(sandbox: Sandbox, name: str, timeout_s: float) -> Any:
    def run(params: dict[str, Any], ctx: Context) -> Any:  # a plain function: the SDK runs it in a thread
        request = {"kind": "action", "action": name, "params": params, "config": ctx.config,
                   "host": ctx.host, "action_id": ctx.action_id}
        doc = _reply(sandbox.call(json.dumps(request).encode(), timeout_s))
        error = doc.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise PluginFault("the guest's error is not an object")
            raise ActionError(str(error.get("message", ""))[:4096], code=str(error.get("code") or "action_failed"))
        if "ok" not in doc:
            raise PluginFault("the guest's reply has neither `ok` nor `error`")
        return doc["ok"]

    return run


def _on_event(sandbox: Sandbox) -> Any:
    def handle(event: Event, ctx: Context) -> list[ProposedAction]:
        request = {"kind": "event", "event": event.model_dump(mode="json"), "config": ctx.config, "host": ctx.host}
        doc = _reply(sandbox.call(json.dumps(request).encode(), DEFAULT_TIMEOUT_S))
        error = doc.get("error")
        if error is not None:  # the handler failed: the SDK naks, and the event comes back after its backoff
            message = error.get("message") if isinstance(error, dict) else None
            raise ActionError(f"the guest's event handler failed: {str(message)[:1000]}", code="plugin_fault")
        wanted = doc.get("propose") or []
        if not isinstance(wanted, list):
            raise PluginFault("the guest's `propose` is not a list")
        out = []
        for item in wanted:
            if not isinstance(item, dict) or not isinstance(item.get("action"), str):
                raise PluginFault("a proposed action is not an object with an `action` name")
            params = item.get("params") or {}
            reason = item.get("reason")
            out.append(ctx.propose(item["action"], params if isinstance(params, dict) else {},
                                   reason=reason if isinstance(reason, str) else None))
        return out

    return handle


def cache_dir(state_dir: Path, plugin: str) -> Path:
    """Where compiled modules are kept: the plugin's own work directory, which the guest never sees."""
    return state_dir / "plugins" / plugin / "wasm-cache"


def load(folder: Path, environ: dict[str, str] | None = None, state_dir: Path | None = None,
         config: dict[str, Any] | None = None) -> tuple[Plugin, Sandbox]:
    manifest = load_manifest(folder)
    if manifest.runtime != "wasm":
        raise ConfigError(f"{folder}: runtime {manifest.runtime!r} is not run by the wasm host")
    limits = Limits.of(manifest, dirs_from_env(environ), config)
    sandbox = Sandbox(folder / manifest.entry_point, limits,
                      cache_dir(state_dir, manifest.name) if state_dir is not None else None)
    return guest_plugin(folder, manifest, sandbox), sandbox


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m tuxpilot.sdk.wasm FOLDER\n")
        return 2
    try:
        settings = load_plugin_settings()
        setup_logging(settings.log.level, settings.log.format)
        folder = Path(argv[0]).resolve()
        name = load_manifest(folder).name
        plugin, sandbox = load(folder, None, settings.state_dir, settings.plugin(name).config)
        log.info("wasm.loaded", plugin=plugin.name, cache_hit=sandbox.cache_hit,
                 memory_mb=sandbox.limits.memory_bytes >> 20, fuel=sandbox.limits.fuel,
                 dirs=[str(d.host) for d in sandbox.limits.dirs], keep_state=sandbox.limits.keep_state)
        try:
            asyncio.run(plugin.main(settings))
        finally:
            sandbox.close()
    except TuxPilotError as exc:
        sys.stderr.write(f"{exc.message}\n")
        return 2 if exc.code == "invalid_config" else 3 if exc.code == "unavailable" else 1
    except (OSError, ConnectionError) as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
