"""`tuxpilot plugin install | update | remove` against a real `tuxpilot up`: the agent verifies each package
against its own trusted keys, runs the plugin without a restart, grants no dangerous permission unless
named, rolls a crashing update back, and removes everything it made. The attacks are performed for real:
a plugin's own credentials asking the agent to install, a package asking for a dangerous permission, an
unsigned package, an update that crashes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import psutil
import pytest
from tuxpilot.pdk import keys, package
from tuxpilot.protocol.launch import CredentialFile

from tests.conftest import need, tuxpilot_exe

pytestmark = pytest.mark.slow

HELLO = Path(__file__).resolve().parent.parent / "plugins" / "hello"
HOST = "inst-host"


class Up:
    def __init__(self, tmp: Path, conf: Path):
        self.state = tmp / "state"
        self.conf = conf
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")}
        self.env = {**env, "TUXPILOT_CONFIG": str(conf), "TUXPILOT_STATE_DIR": str(self.state),
                    "TUXPILOT_HOST_ID": HOST, "TUXPILOT_MONITOR_ENABLED": "false",
                    "TUXPILOT_INSTALL_HEALTH_TIMEOUT_S": "20"}
        self.log = (tmp / "up.log").open("w+")
        self.proc = subprocess.Popen([tuxpilot_exe(), "up", "--quiet"], stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        wait("the agent", lambda: self.cli("status", "--json").returncode == 0)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tuxpilot_exe(), *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def call(self, action: str) -> tuple[int, dict[str, object]]:
        done = self.cli("call", HOST, "hello", action, "{}")
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            return done.returncode, {"stderr": done.stderr}

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()


def wait(what: str, check: Callable[[], bool], limit: float = 40) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def running_from(pid: int, folder: str) -> bool:
    """Whether a process under `pid` names `folder` on its command line."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if folder in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # gone meanwhile
            continue
    return False


def traces(up: Up) -> dict[str, bool]:
    """What the agent keeps of hello on the bus: its registry entry, durable consumer, plugin state."""
    status = json.loads(up.cli("status", "--json").stdout)
    return {"registered": f"{HOST}.hello" in status["registered"],
            "consumer": any(c["name"] == f"hello-{HOST}" for c in status["consumers"]),
            "state": f"{HOST}.hello" in status["plugin_states"]}


def hello(tmp: Path, version: str, *, crash: bool = False, slow: bool = False) -> Path:
    """hello at `version`, asking for system_access (dangerous) for its `shout` action; `crash`: it dies at
    start-up, as a broken release would; `slow`: it takes a minute to start."""
    folder = tmp / f"src-{version}"
    shutil.copytree(HELLO, folder)
    manifest = folder / "plugin.toml"
    text = manifest.read_text().replace('version = "0.1.0"', f'version = "{version}"')
    text = text.replace('permissions = ["filesystem_read"]', 'permissions = ["filesystem_read", "system_access"]')
    text += '\n[actions.shout]\ndescription = "Shouts."\npermission = "system_access"\ntimeout_s = 5\n'
    manifest.write_text(text)
    code = (folder / "plugin.py").read_text()
    code = code.replace('return {"greeting": f"hello, {params[\'name\']}"}',
                        'return {"greeting": f"hello, {params[\'name\']}", "version": plugin.manifest.version}')
    code = code.replace('if __name__ == "__main__":',
                        '@plugin.action("shout")\ndef shout(params: dict[str, Any], ctx: Any) -> dict[str, Any]:\n'
                        '    return {"shouted": True}\n\n\nif __name__ == "__main__":')
    if crash:
        code = code.replace("plugin = Plugin.here(__file__)", 'raise SystemExit("broken release")')
    if slow:
        start = "plugin = Plugin.here(__file__)"
        code = code.replace(start, f"import time\ntime.sleep(60)\n{start}")
    (folder / "plugin.py").write_text(code)
    return folder


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    conf = tmp_path / "host.toml"
    conf.write_text("run_plugins = []\n")
    running = Up(tmp_path, conf)
    yield running
    if running.proc.poll() is None:
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait()


@pytest.fixture
def signer(up: Up) -> keys.Signer:
    publisher = keys.Signer.generate("acme")
    keys.TrustStore(up.state / "keys" / "trusted").trust(publisher.public)
    return publisher


def test_install_update_rollback_remove(up: Up, signer: keys.Signer, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    v1 = package.build(hello(tmp_path, "0.1.0"), out, signer)
    agent_pid = up.proc.pid

    # Installed and running without a restart; the dangerous permission it asks for is shown, not granted.
    done = up.cli("plugin", "install", str(v1))
    assert done.returncode == 0, done.stderr + up.output()
    assert "installed hello 0.1.0" in done.stdout and f"signed by key {signer.id}" in done.stdout, done.stdout
    assert "NOT granted: system_access" in done.stdout, done.stdout
    code, reply = up.call("greet")
    assert code == 0 and reply["data"] == {"greeting": "hello, world", "version": "0.1.0"}, reply
    code, reply = up.call("shout")
    assert code == 1 and reply["code"] == "permission_not_granted", reply
    assert up.proc.pid == agent_pid and up.proc.poll() is None
    assert traces(up) == {"registered": True, "consumer": True, "state": True}
    listed = {p["name"]: p for p in json.loads(up.cli("plugin", "list", "--json").stdout)}
    assert listed["hello"]["version"] == "0.1.0" and listed["hello"]["granted"] == ["filesystem_read"]

    # Installing it again is refused: that is what update is for.
    again = up.cli("plugin", "install", str(v1))
    assert again.returncode == 2 and "update hello" in again.stderr, again.stderr

    # An update whose new version crashes at start-up is rolled back: the old one serves again.
    broken = package.build(hello(tmp_path, "0.2.0", crash=True), out, signer)
    done = up.cli("plugin", "update", str(broken))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rolled back to 0.1.0" in done.stderr and "exited" in done.stderr, done.stderr
    code, reply = up.call("greet")
    assert code == 0 and reply["data"]["version"] == "0.1.0", reply
    assert not (up.state / "installed" / "hello" / "0.2.0").exists()
    assert json.loads((up.state / "installed" / "index.json").read_text())["plugins"]["hello"]["version"] == "0.1.0"

    # A good update, granting the dangerous permission by name.
    v3 = package.build(hello(tmp_path, "0.3.0"), out, signer)
    done = up.cli("plugin", "update", str(v3), "--grant", "system_access")
    assert done.returncode == 0, done.stderr + up.output()
    assert "updated hello 0.3.0 (was 0.1.0)" in done.stdout, done.stdout
    code, reply = up.call("greet")
    assert code == 0 and reply["data"]["version"] == "0.3.0", reply
    wait("the grant in force", lambda: up.call("shout")[0] == 0)
    assert not (up.state / "installed" / "hello" / "0.1.0").exists()

    # Removed: process, files, credentials, consumer, registry entry and grants.
    done = up.cli("plugin", "remove", "hello")
    assert done.returncode == 0, done.stderr
    code, reply = up.call("greet")
    assert code != 0, reply
    assert not (up.state / "installed" / "hello").exists()
    assert not (up.state / "credentials" / f"tuxpilot-{HOST}-plugin-hello.json").exists()
    assert "hello" not in up.conf.read_text()
    assert traces(up) == {"registered": False, "consumer": False, "state": False}
    assert up.proc.pid == agent_pid and up.proc.poll() is None


def test_the_agent_refuses_what_it_should(up: Up, signer: keys.Signer, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    # Unsigned, and signed by a key this host does not trust: refused with one line, nothing installed.
    unsigned = package.build(hello(tmp_path, "0.1.0"), out, None)
    done = up.cli("plugin", "install", str(unsigned))
    assert done.returncode == 1 and "sign" in done.stderr, done.stderr
    stranger = package.build(hello(tmp_path, "0.1.1"), out, keys.Signer.generate("mallory"))
    done = up.cli("plugin", "install", str(stranger))
    assert done.returncode == 1 and "trust" in done.stderr, done.stderr
    # --grant of a permission the plugin does not ask for.
    v1 = package.build(hello(tmp_path, "0.1.2"), out, signer)
    done = up.cli("plugin", "install", str(v1), "--grant", "user_management")
    assert done.returncode == 2 and "does not ask for user_management" in done.stderr, done.stderr
    # A package may not take the name of a plugin the host has otherwise (it would inherit its grants,
    # credentials and consumer): here the built-in sysmon.
    impostor = hello(tmp_path, "9.0.0")
    (impostor / "plugin.toml").write_text((impostor / "plugin.toml").read_text().replace('"hello"', '"sysmon"'))
    done = up.cli("plugin", "install", str(package.build(impostor, out, signer)))
    assert done.returncode == 2 and "already has a plugin named 'sysmon'" in done.stderr, done.stderr
    assert not (up.state / "installed" / "hello").exists()

    # Installed; then the plugin's own credentials ask the agent to install (or remove) a package: the server
    # refuses the publish, the agent never hears of it.
    assert up.cli("plugin", "install", str(v1)).returncode == 0
    creds = CredentialFile.model_validate_json(
        (up.state / "credentials" / f"tuxpilot-{HOST}-plugin-hello.json").read_text())

    async def attack() -> list[str]:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        from tuxpilot.bus.connect import url_file

        server = url_file(up.state).read_text().strip()
        nc = await nats.connect(server, user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix,
                                error_cb=on_error, allow_reconnect=False)
        try:
            body = json.dumps({"package": base64.b64encode(v1.read_bytes()).decode(), "grant": ["system_access"]})
            for verb, doc in (("install", body), ("remove", json.dumps({"name": "hello"}))):
                with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                    await nc.request(f"tuxpilot.agent.{HOST}.{verb}", doc.encode(), timeout=1)
            await asyncio.sleep(0.2)
        finally:
            await nc.close()
        return errors

    errors = asyncio.run(attack())
    assert any(f'publish to "tuxpilot.agent.{HOST}.install"' in e for e in errors), errors
    assert any(f'publish to "tuxpilot.agent.{HOST}.remove"' in e for e in errors), errors
    code, reply = up.call("greet")
    assert code == 0, reply
    assert "system_access" not in up.conf.read_text()

    # The agent killed in the middle of an update (the new version still starting): restarted, it runs the
    # version installed before, which starts with it without a run_plugins entry.
    slow = package.build(hello(tmp_path, "0.1.3", slow=True), out, signer)
    updating = subprocess.Popen([tuxpilot_exe(), "plugin", "update", str(slow)], env=up.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait("0.1.3 starting", lambda: running_from(up.proc.pid, "/hello/0.1.3"))
        up.proc.kill()
        up.proc.wait(timeout=30)
    finally:
        updating.kill()
        updating.wait()
    restarted = Up(tmp_path, up.conf)
    try:
        wait("hello after the restart", lambda: restarted.call("greet")[0] == 0)
        assert restarted.call("greet")[1]["data"]["version"] == "0.1.2"

        # The host config allows unsigned packages from now on (read live): one installs, marked UNSIGNED.
        with up.conf.open("a") as conf:
            conf.write("\n[marketplace]\nallow_unsigned = true\n")
        wait("the config reloaded", lambda: "config.reloaded" in restarted.output())
        done = restarted.cli("plugin", "update", str(package.build(hello(tmp_path, "0.1.4"), out, None)))
        assert done.returncode == 0 and "updated hello 0.1.4 (was 0.1.2): UNSIGNED" in done.stdout, done.stderr
        stranger = package.build(hello(tmp_path, "0.1.5"), out, keys.Signer.generate("mallory"))
        done = restarted.cli("plugin", "update", str(stranger))
        assert done.returncode == 0 and "(NOT a trusted key)" in done.stdout, done.stdout + done.stderr
    finally:
        restarted.proc.send_signal(signal.SIGTERM)
        restarted.proc.wait(timeout=30)


@pytest.mark.timeout(300)
async def test_fleet_install_through_each_targeted_hosts_agent(tmp_path: Path) -> None:
    """`--hosts 'web-*'`: one request on the fan-out subject, each targeted host's agent verifies and installs
    the package itself and answers for itself; a host not targeted installs nothing."""
    from tuxpilot.agent.app import Agent
    from tuxpilot.agent.config import load_config
    from tuxpilot.bus.server import NatsServer
    from tuxpilot.fleet import admin

    fleet_dir = tmp_path / "fleet"
    admin.init(fleet_dir, urls=["nats://127.0.0.1:4222"])
    fleet = admin.load(fleet_dir)
    server = NatsServer(tmp_path / "srv", extra_config=admin.operator_block(fleet, tmp_path / "srv" / "jwt")).start()
    agents: list[Agent] = []
    publisher = keys.Signer.generate("acme")
    try:
        hosts = {"web-1": "web", "web-2": "web", "db-1": "db"}
        for host, role in hosts.items():
            fleet, _ = admin.enroll(fleet_dir, host, {"role": role})
        sys_nc = await nats.connect(server.url, user_credentials=str(fleet_dir / "sys.creds"))
        await admin.push(sys_nc, fleet)
        await sys_nc.close()
        for host, role in hosts.items():
            state = tmp_path / f"state-{host}"
            keys.TrustStore(state / "keys" / "trusted").trust(publisher.public)
            config = load_config(environ={
                "TUXPILOT_NATS_URL": server.url, "TUXPILOT_HOST_ID": host, "TUXPILOT_STATE_DIR": str(state),
                "TUXPILOT_MONITOR_ENABLED": "false", "TUXPILOT_RUN_PLUGINS": "[]",
                "TUXPILOT_FLEET_ENROLLMENT": str(fleet_dir / "hosts" / f"{host}.json"),
                "TUXPILOT_FLEET_LABELS": json.dumps({"role": role}),
            })
            config._source = tmp_path / f"{host}.toml"  # where --grant would write
            agents.append(Agent(config, embedded=False))
            await agents[-1].start()
        out = tmp_path / "dist"
        out.mkdir()
        v1 = package.build(hello(tmp_path, "0.1.0"), out, publisher)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUXPILOT_")},
               "TUXPILOT_NATS_URL": server.url, "TUXPILOT_NATS_CREDS": str(fleet_dir / "admin.creds"),
               "TUXPILOT_HOST_ID": "admin", "TUXPILOT_CONFIG": os.devnull}
        done = await asyncio.to_thread(
            subprocess.run, [tuxpilot_exe(), "plugin", "install", str(v1), "--hosts", "web-*", "--fleet-dir",
                             str(fleet_dir), "--timeout", "90"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 of 2 targeted host(s) answered" in done.stdout and "db-1" not in done.stdout, done.stdout
        assert (tmp_path / "state-web-2" / "installed" / "hello" / "0.1.0").is_dir()
        assert not (tmp_path / "state-db-1" / "installed").exists()
        admin_nc = await nats.connect(server.url, user_credentials=str(fleet_dir / "admin.creds"))
        try:
            for host in ("web-1", "web-2"):
                reply = await admin_nc.request(f"tuxpilot.act.{host}.hello.greet", b"{}", timeout=10)
                assert json.loads(reply.data)["data"]["version"] == "0.1.0", reply.data
        finally:
            await admin_nc.close()

        # The admin publishes 0.2.0 to the fleet's registry; each web host's agent fetches it by name.
        v2 = package.build(hello(tmp_path, "0.2.0"), out, publisher)
        published = await asyncio.to_thread(
            subprocess.run, [tuxpilot_exe(), "plugin", "publish", str(v2)], capture_output=True, text=True, env=env,
            timeout=60)
        assert published.returncode == 0, published.stdout + published.stderr
        done = await asyncio.to_thread(
            subprocess.run, [tuxpilot_exe(), "plugin", "update", "hello", "--hosts", "web-*", "--fleet-dir",
                             str(fleet_dir), "--timeout", "90"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and "2 of 2 targeted host(s) answered" in done.stdout, done.stdout + done.stderr
        admin_nc = await nats.connect(server.url, user_credentials=str(fleet_dir / "admin.creds"))
        try:
            for host in ("web-1", "web-2"):
                reply = await admin_nc.request(f"tuxpilot.act.{host}.hello.greet", b"{}", timeout=10)
                assert json.loads(reply.data)["data"]["version"] == "0.2.0", reply.data
        finally:
            await admin_nc.close()

        # A host's own operator may ask its own agent, not every agent of the fleet: the server refuses.
        from tuxpilot.fleet import member, scopes
        from tuxpilot.protocol.names import Subjects

        enrollment = member.load_enrollment(fleet_dir / "hosts" / "db-1.json")
        operator = member.write_creds(tmp_path / "op-db-1", enrollment, "operator")
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        op_nc = await nats.connect(server.url, user_credentials=str(operator), error_cb=on_error,
                                   inbox_prefix=scopes.inbox_of("operator", Subjects("tuxpilot", "db-1")),
                                   allow_reconnect=False)
        try:
            body = json.dumps({"package": base64.b64encode(v1.read_bytes()).decode()}).encode()
            await op_nc.publish("tuxpilot.fleet.agent.install", body, headers={"Tuxpilot-Hosts": "web-*"})
            await op_nc.flush()
            await asyncio.sleep(0.5)
        finally:
            await op_nc.close()
        assert any('publish to "tuxpilot.fleet.agent.install"' in e for e in errors), errors
        assert not (tmp_path / "state-db-1" / "installed").exists()
    finally:
        for agent in agents:
            await agent.stop()
        server.stop()


def test_javascript_and_wasm_packages_are_prepared_for_their_runtime(up: Up, signer: keys.Signer,
                                                                      tmp_path: Path) -> None:
    """The agent runs `npm ci` (no install scripts) in the installed folder before it starts a JavaScript
    plugin (the package carries no node_modules), and checks a wasm plugin's module with wasmtime; both come
    up healthy and serve through the gate."""
    from tests.wasm import guests

    wasm = tmp_path / "echoer"
    wasm.mkdir()
    guests.build("echo", wasm).rename(wasm / "guest.wasm")
    (wasm / "plugin.toml").write_text(
        'name = "echoer"\nversion = "1.0.0"\ndescription = "echoes"\ncategory = "development"\n'
        'runtime = "wasm"\nentry_point = "guest.wasm"\napi_version = "1"\n[actions.echo]\n[limits]\nmemory_mb = 16\n')
    wasm_out = tmp_path / "wasm-dist"
    wasm_out.mkdir()
    done = up.cli("plugin", "install", str(package.build(wasm, wasm_out, signer)))
    assert done.returncode == 0 and "installed echoer 1.0.0" in done.stdout, done.stderr + up.output()
    called = up.cli("call", HOST, "echoer", "echo", '{"x": 1}')
    assert called.returncode == 0 and '"action": "echo"' in called.stdout, called.stdout + called.stderr
    broken = tmp_path / "broken"
    shutil.copytree(wasm, broken)
    (broken / "guest.wasm").write_bytes(b"\0asm not really")
    (broken / "plugin.toml").write_text((broken / "plugin.toml").read_text().replace('"echoer"', '"broken"'))
    done = up.cli("plugin", "install", str(package.build(broken, wasm_out, signer)))
    assert done.returncode == 1 and "not a valid WebAssembly module" in done.stderr, done.stderr
    assert not (up.state / "installed" / "broken").exists()

    for program in ("node", "npm"):
        need(program, shutil.which(program) is not None, f"{program} is not on PATH")
    from tuxpilot.pdk import scaffold

    made = scaffold.new("jsgreeter", runtime="javascript", category="custom", folder=tmp_path / "jsgreeter")
    assert (made.folder / "package-lock.json").is_file(), made.notes
    shutil.rmtree(made.folder / "node_modules", ignore_errors=True)
    out = tmp_path / "dist"
    out.mkdir()
    built = package.build(made.folder, out, signer)
    done = up.cli("plugin", "install", str(built))
    assert done.returncode == 0, done.stderr + up.output()
    assert "installed jsgreeter 0.1.0" in done.stdout, done.stdout
    folder = up.state / "installed" / "jsgreeter" / "0.1.0"
    assert (folder / "node_modules").is_dir() and (folder / "package-lock.json").is_file()
    assert "plugin.npm_installed" in up.output()


def test_install_and_update_by_name_from_the_fleet_registry(up: Up, signer: keys.Signer, tmp_path: Path) -> None:
    """Published to the host's own bus by its operator; the agent fetches by name, checks the file against the
    index entry and verifies it against its own trusted keys; `update` takes the newest published."""
    out = tmp_path / "dist"
    out.mkdir()
    v1 = package.build(hello(tmp_path, "0.1.0"), out, signer)
    v2 = package.build(hello(tmp_path, "0.2.0"), out, signer)
    published = up.cli("plugin", "publish", str(v1))
    assert published.returncode == 0 and "published hello@0.1.0 to fleet" in published.stdout, published.stderr
    missing = up.cli("plugin", "install", "hello@9.9.9")
    assert missing.returncode != 0 and "no version 9.9.9 of hello in registry fleet" in missing.stderr
    done = up.cli("plugin", "install", "hello")
    assert done.returncode == 0 and "installed hello 0.1.0" in done.stdout, done.stderr + up.output()
    assert up.cli("plugin", "publish", str(v2)).returncode == 0
    assert json.loads(up.cli("plugin", "info", "hello", "--json").stdout)["versions"] == ["0.1.0", "0.2.0"]
    done = up.cli("plugin", "update", "hello")
    assert done.returncode == 0 and "0.2.0" in done.stdout, done.stderr + up.output()
    code, reply = up.call("greet")
    assert code == 0 and reply["data"] == {"greeting": "hello, world", "version": "0.2.0"}, reply
    newest = up.cli("plugin", "update", "hello")
    assert newest.returncode == 2 and "has nothing newer" in newest.stderr, newest.stderr
