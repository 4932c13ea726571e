"""The wasm runtime: the sandbox's limits on hand-written WAT guests (a loop, a memory hog, traps, a
reply outside memory, fuel, state between calls, the compiled-module cache), then a real agent running a
wasm plugin process over a real nats-server, which answers each fault with a structured error and then
serves the next call; and the shipped Rust example plugin, built from source."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tuxpilot.agent.app import Agent
from tuxpilot.bus.connect import connect
from tuxpilot.bus.server import NatsServer
from tuxpilot.protocol.names import Subjects
from tuxpilot.sdk.wasm import GuestTimeout, Limits, PluginFault, Preopen, ResourceExhausted, Sandbox

from tests.conftest import IN_CI, need
from tests.test_runtimes import host_config, make_plugin
from tests.wasm import guests

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def action(name: str, params: dict[str, object] | None = None) -> bytes:
    return json.dumps({"kind": "action", "action": name, "params": params or {}, "config": {}, "host": "h"}).encode()


def sandbox(tmp_path: Path, kind: str, **limits: object) -> Sandbox:
    return Sandbox(guests.build(kind, tmp_path), Limits(**{"memory_bytes": 16 * MiB, **limits}))  # type: ignore[arg-type]


# -- the sandbox ---------------------------------------------------------------------------------------


def test_a_guest_answers_through_the_abi(tmp_path: Path) -> None:
    box = sandbox(tmp_path, "echo")
    assert json.loads(box.call(action("x", {"a": 1}))) == {"ok": json.loads(action("x", {"a": 1}))}


def test_a_looping_guest_is_stopped_at_its_deadline_and_the_next_call_runs(tmp_path: Path) -> None:
    box = sandbox(tmp_path, "multi")
    with pytest.raises(GuestTimeout) as caught:
        box.call(action("loop"), timeout_s=0.1)
    assert caught.value.code == "timeout" and "0.1 s deadline" in caught.value.message
    assert json.loads(box.call(action("echo")))["ok"]["action"] == "echo"


def test_a_guest_growing_past_its_memory_cap_is_resource_exhausted(tmp_path: Path) -> None:
    box = sandbox(tmp_path, "multi", memory_bytes=16 * MiB)
    with pytest.raises(ResourceExhausted) as caught:
        box.call(action("hog"))
    assert caught.value.code == "resource_exhausted" and "16384 KiB memory cap" in caught.value.message
    assert json.loads(box.call(action("echo")))["ok"]["action"] == "echo"


def test_a_guest_whose_initial_memory_is_over_the_cap_is_resource_exhausted(tmp_path: Path) -> None:
    box = Sandbox(guests.build("echo", tmp_path, pages=512), Limits(memory_bytes=16 * MiB))  # 32 MiB
    with pytest.raises(ResourceExhausted):
        box.call(action("echo"))


def test_a_trapping_guest_is_a_plugin_fault(tmp_path: Path) -> None:
    with pytest.raises(PluginFault) as caught:
        sandbox(tmp_path, "multi").call(action("trap"))
    assert caught.value.code == "plugin_fault" and "unreachable" in caught.value.message
    with pytest.raises(PluginFault, match="integer division by zero"):
        sandbox(tmp_path, "divide").call(action("x"))


def test_a_reply_outside_the_guests_memory_is_a_plugin_fault(tmp_path: Path) -> None:
    with pytest.raises(PluginFault, match="outside its memory"):
        sandbox(tmp_path, "multi").call(action("oob"))


def test_fuel_from_cpu_s_stops_a_loop_before_its_deadline(tmp_path: Path) -> None:
    box = sandbox(tmp_path, "loop", fuel=1_000_000)
    with pytest.raises(ResourceExhausted, match="fuel"):
        box.call(action("loop"), timeout_s=60)


def test_no_state_survives_a_call_unless_the_manifest_keeps_it(tmp_path: Path) -> None:
    fresh = sandbox(tmp_path, "counter")
    assert [json.loads(fresh.call(action("c"))) for _ in range(3)] == [{"ok": 1}] * 3
    kept = sandbox(tmp_path, "counter", keep_state=True)
    assert [json.loads(kept.call(action("c"))) for _ in range(3)] == [{"ok": 1}, {"ok": 2}, {"ok": 3}]


def test_compiled_modules_are_cached_by_engine_version_and_config(tmp_path: Path) -> None:
    wasm, cache = guests.build("echo", tmp_path), tmp_path / "cache"
    first = Sandbox(wasm, Limits(memory_bytes=16 * MiB), cache)
    again = Sandbox(wasm, Limits(memory_bytes=16 * MiB), cache)
    other = Sandbox(wasm, Limits(memory_bytes=32 * MiB, fuel=10), cache)
    assert (first.cache_hit, again.cache_hit, other.cache_hit) == (False, True, False)
    assert first.cache_key == again.cache_key != other.cache_key
    assert len(list(cache.glob("*.cwasm"))) == 2
    assert json.loads(again.call(action("x")))["ok"]["action"] == "x"


# -- C guests, and the filesystem and environment a guest gets -----------------------------------------

def c_toolchain() -> bool:
    return shutil.which("clang") is not None and Path("/usr/lib/wasm32-wasi/libc.a").is_file()


def build_c(source: Path, out: Path) -> Path:
    """A C guest built as the README says (Debian's clang and wasi-libc)."""
    need("clang with wasi-libc", c_toolchain(), "apt-get install clang lld wasi-libc libclang-rt-dev-wasm32")
    subprocess.run(["clang", "--target=wasm32-wasi", "-mexec-model=reactor", "-O2", "-Wl,--strip-all",
                    "-I", str(REPO / "guests" / "c"), "-o", str(out), str(source)], check=True, timeout=300)
    return out


def test_a_c_guest_sees_only_the_directories_it_is_given_read_only_unless_write(tmp_path: Path) -> None:
    wasm = build_c(REPO / "tests" / "wasm" / "c" / "fsprobe.c", tmp_path / "fsprobe.wasm")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note").write_text("in the shared dir\n")

    def run(dirs: tuple[Preopen, ...]) -> list[dict[str, object]]:
        box = Sandbox(wasm, Limits(memory_bytes=16 * MiB, dirs=dirs))
        calls = [action("read", {"path": f"{shared}/note"}), action("read", {"path": "/etc/hostname"}),
                 action("read", {"path": f"{shared}/../../../../etc/hostname"}),
                 action("write", {"path": f"{shared}/new", "text": "x"}), action("env")]
        return [json.loads(box.call(c)) for c in calls]

    nothing = run(())
    assert [next(iter(r)) for r in nothing[:4]] == ["error"] * 4 and not (shared / "new").exists()
    assert nothing[4] == {"ok": {"environ": 0, "home": False}}
    read_only = run((Preopen(shared, str(shared)),))
    assert read_only[0] == {"ok": {"text": "in the shared dir\n"}}
    assert [next(iter(r)) for r in read_only[1:4]] == ["error"] * 3 and not (shared / "new").exists()
    writable = run((Preopen(shared, str(shared), write=True),))
    assert writable[3] == {"ok": {"written": 1}} and (shared / "new").read_text() == "x"
    assert [next(iter(r)) for r in writable[1:3]] == ["error"] * 2


# -- a wasm plugin process under a real agent ------------------------------------------------------------

FAULTS = """
[actions.echo]
[actions.loop]
timeout_s = 0.2
[actions.hog]
[actions.trap]
[actions.oob]
[limits]
memory_mb = 16
"""


async def test_a_wasm_plugin_answers_each_fault_with_an_error_and_serves_the_next_call(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    base = tmp_path / "plugins"
    folder = make_plugin(base, "faulty", "wasm", "guest.wasm", "", extra=FAULTS)
    guests.build("multi", folder).rename(folder / "guest.wasm")
    config = host_config([base], ["faulty"], url=nats_server.url, TUXPILOT_CONFINEMENT_USER="root")
    subjects = Subjects.of(config)
    async with Agent(config, embedded=False) as agent:
        assert agent.host is not None and "faulty" in agent.host.plugins
        nc = await connect(config.nats, nats_server.url, name="test")
        try:
            async def call(name: str) -> tuple[dict[str, object], dict[str, str]]:
                for _ in range(100):  # the plugin process is still starting
                    try:
                        msg = await nc.request(subjects.act("faulty", name), b"{}", timeout=5)
                        return json.loads(msg.data), dict(msg.headers or {})
                    except Exception:
                        await asyncio.sleep(0.1)
                raise AssertionError(f"no answer from faulty.{name}")

            assert (await call("echo"))[0]["data"]["action"] == "echo"  # type: ignore[index]
            pid = agent.host.plugins["faulty"].pid
            for name, code in (("loop", "timeout"), ("hog", "resource_exhausted"), ("trap", "plugin_fault"),
                               ("oob", "plugin_fault")):
                body, headers = await call(name)
                assert body["code"] == code, body
                assert headers.get("Nats-Service-Error-Code") in {"504", "507", "502"}
                # the same process serves the next call
                assert (await call("echo"))[0]["data"]["action"] == "echo"  # type: ignore[index]
                assert agent.host.plugins["faulty"].pid == pid
        finally:
            await nc.close()


FSPROBE = """
permissions = ["filesystem_read", "filesystem_write"]
[actions.read]
permission = "filesystem_read"
[actions.write]
permission = "filesystem_write"
[actions.env]
"""


async def test_the_host_gives_a_wasm_plugin_its_directories_by_grant_only(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The manifest asks for both filesystem permissions; the host grants read only, on one directory.
    Through the real agent: reads in it work, writes and reads elsewhere are refused by the sandbox."""
    base = tmp_path / "plugins"
    folder = make_plugin(base, "fsprobe", "wasm", "fsprobe.wasm", "", extra=FSPROBE)
    build_c(REPO / "tests" / "wasm" / "c" / "fsprobe.c", folder / "fsprobe.wasm")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note").write_text("granted\n")
    grants = {"fsprobe": {"permissions": ["filesystem_read"], "sandbox_dirs": [str(shared)]}}
    config = host_config([base], ["fsprobe"], url=nats_server.url, TUXPILOT_CONFINEMENT_USER="root",
                         TUXPILOT_PLUGINS=json.dumps(grants))
    subjects = Subjects.of(config)
    async with Agent(config, embedded=False):
        nc = await connect(config.nats, nats_server.url, name="test")
        try:
            async def call(name: str, params: dict[str, str]) -> dict[str, object]:
                for _ in range(100):
                    try:
                        msg = await nc.request(subjects.act("fsprobe", name), json.dumps(params).encode(), timeout=5)
                        return json.loads(msg.data)  # type: ignore[no-any-return]
                    except Exception:
                        await asyncio.sleep(0.1)
                raise AssertionError(f"no answer from fsprobe.{name}")

            assert (await call("read", {"path": f"{shared}/note"}))["data"] == {"text": "granted\n"}
            assert (await call("read", {"path": "/etc/hostname"}))["code"] == "not_found"
            assert (await call("read", {"path": f"{shared}/../../../etc/hostname"}))["code"] == "not_found"
            assert (await call("env", {}))["data"] == {"environ": 0, "home": False}
            # Ungranted, write is refused either by the gate (when it checks grants) or by the read-only dir.
            assert "code" in await call("write", {"path": f"{shared}/new", "text": "x"})
            assert not (shared / "new").exists()
        finally:
            await nc.close()


# -- the shipped Rust example, built from source ------------------------------------------------------

def rust_toolchain() -> bool:
    return (Path("/usr/bin/cargo").exists() and Path("/usr/lib/rustlib/wasm32-unknown-unknown").is_dir()
            and Path("/usr/share/cargo/registry").is_dir())


def test_diskpolicy_builds_from_source_and_plans_a_cleanup(tmp_path: Path) -> None:
    need("Debian's Rust wasm toolchain", rust_toolchain(),
         "apt-get install rustc cargo libstd-rust-dev-wasm32 librust-serde-json-dev")
    # A copy of the sources (without any built module), built the way the README says; the build
    # directory is the checkout's, so a build made before the tests is reused.
    folder = tmp_path / "plugins" / "diskpolicy"
    shutil.copytree(REPO / "plugins" / "diskpolicy", folder, ignore=shutil.ignore_patterns("target", "*.wasm"))
    shutil.copytree(REPO / "guests" / "rust", tmp_path / "guests" / "rust", ignore=shutil.ignore_patterns("target"))
    built = subprocess.run(
        [str(folder / "build.sh")], capture_output=True, text=True, timeout=900, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
             "CARGO_TARGET_DIR": str(REPO / "plugins" / "diskpolicy" / "target")})
    assert built.returncode == 0, built.stderr[-2000:]
    box = Sandbox(folder / "diskpolicy.wasm", Limits(memory_bytes=16 * MiB))
    plan = json.loads(box.call(json.dumps({"kind": "action", "action": "plan_cleanup",
                                           "params": {"mount": "/var", "used_pct": 97},
                                           "config": {"critical_pct": 95}}).encode()))["ok"]
    assert plan["severity"] == "critical" and "docker image prune -a" in [s["command"] for s in plan["steps"]]
    calm = json.loads(box.call(json.dumps({"kind": "action", "action": "plan_cleanup",
                                           "params": {"mount": "/var", "used_pct": 90},
                                           "config": {"critical_pct": 95}}).encode()))["ok"]
    assert calm["severity"] == "warning" and "docker image prune -a" not in [s["command"] for s in calm["steps"]]
    proposed = json.loads(box.call(json.dumps({"kind": "event", "event": {"resource": "/", "value": 93.0},
                                               "config": {}}).encode()))
    assert proposed == {"propose": [{"action": "plan_cleanup", "params": {"mount": "/", "used_pct": 93.0},
                                     "reason": "/ is 93% full"}]}


def test_the_runtimes_benchmark_prints_python_and_wasm_side_by_side() -> None:
    import sys

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "runtimes.py"), "20"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    # The table's rows: the runtime in its 26-column field, then p50, p99 and RSS; notes follow it.
    rows: dict[str, list[str]] = {}
    for line in out.splitlines()[1:]:
        name, figures = line[:26].strip(), line[26:].split()
        if len(figures) != 3 or not all(f.replace(".", "", 1).isdigit() for f in figures):
            break
        rows[name] = figures
    assert {"python", "wasm"} <= set(rows), out
    # The container rows come with an engine and TuxPilot's image (CI builds both); without them a note
    # says why the column is skipped.
    containers = {"container", "container, host network"}
    assert containers <= set(rows) or "container: skipped" in out, out
    if IN_CI:
        assert containers <= set(rows), out
