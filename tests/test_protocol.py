"""Wire facts with one owner: the launch environment's names are the ones the SDK reads, the credential
file is what auth writes and connect reads, and registry entries agree with schemas/registry.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tuxpilot.bus import auth
from tuxpilot.protocol import launch, schemas
from tuxpilot.protocol.errors import GATE_STATUS_CODES, PLUGIN_STATUS_CODES, BadRequest, ConfigError
from tuxpilot.protocol.manifest import builtin_dir
from tuxpilot.protocol.manifest import load as load_manifest
from tuxpilot.protocol.names import Subjects
from tuxpilot.protocol.registry import RegistryEntry
from tuxpilot.sdk.settings import load_plugin_settings


def test_every_name_the_host_sets_is_read_by_the_sdk(tmp_path: Path) -> None:
    env = {
        launch.PLUGIN: "sysmon",
        launch.PLUGINS: json.dumps({"sysmon": {"config": {"top": 3}}}),
        launch.CONFIG: "/dev/null",
        launch.HOST_ID: "web-1",
        launch.SUBJECT_PREFIX: "acme.tux",
        launch.STATE_DIR: str(tmp_path),
        launch.NATS_URL: "nats://127.0.0.1:4222",
        launch.NATS_USER_FILE: str(tmp_path / "creds.json"),
        launch.LOG_LEVEL: "debug",
        launch.LOG_FORMAT: "json",
        launch.env_name("streams", "backoff_s"): "[2, 4]",
    }
    seen = load_plugin_settings(environ=env)
    assert (seen.host_id, seen.subject_prefix, seen.state_dir) == ("web-1", "acme.tux", tmp_path)
    assert (seen.nats.url, seen.nats.user_file) == ("nats://127.0.0.1:4222", tmp_path / "creds.json")
    assert (seen.log.level, seen.log.format) == ("debug", "json")
    assert seen.plugin("sysmon").config == {"top": 3}
    assert seen.streams.backoff_s == [2.0, 4.0]
    assert launch.NATS_USER_FILE in launch.AGENT_SECRETS  # the agent's own file never reaches a plugin


def test_the_credential_file_auth_writes_is_the_documented_one(tmp_path: Path) -> None:
    subjects = Subjects("tuxpilot", "web-1")
    manifest = load_manifest(builtin_dir() / "sysmon")
    users = auth.users_for(subjects, {"sysmon": manifest})
    auth.provision(tmp_path, users, url="nats://127.0.0.1:4222")
    plugin_user = next(u for u in users if u.plugin == "sysmon")
    path = auth.credential_file(tmp_path, plugin_user.name)
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    assert set(doc) == {"user", "password", "inbox_prefix", "url"}
    creds = launch.CredentialFile.model_validate(doc)
    assert creds.inbox_prefix == "_INBOX_tuxpilot-web-1-plugin-sysmon"


def test_a_registry_entry_agrees_with_its_schema() -> None:
    manifest = load_manifest(builtin_dir() / "sysmon")
    entry = RegistryEntry.of("web-1", manifest)
    raw = entry.to_json()
    schemas.validator("registry").check(json.loads(raw))
    back = RegistryEntry.from_json(raw)
    assert back.manifest.to_doc() == manifest.to_doc()
    assert (back.host, back.plugin) == ("web-1", "sysmon")


@pytest.mark.parametrize(
    ("mutate", "says"),
    [
        (lambda d: d.pop("host"), "host"),
        (lambda d: d.update(plugin="docker"), "holds the manifest of 'sysmon'"),
        (lambda d: d["manifest"].update(runtime="cobol"), "/manifest/runtime"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_a_bad_registry_entry_is_refused_with_a_reason(mutate: object, says: str) -> None:
    manifest = load_manifest(builtin_dir() / "sysmon")
    doc = json.loads(RegistryEntry.of("web-1", manifest).to_json())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(BadRequest, match=says):
        RegistryEntry.from_json(json.dumps(doc).encode())


def test_garbage_in_the_registry_is_a_bad_request() -> None:
    for raw in (b"", b"{nope", b"[]", b'{"host": "h"}'):
        with pytest.raises(BadRequest):
            RegistryEntry.from_json(raw)


def test_a_manifest_of_a_protocol_version_this_tuxpilot_does_not_speak_is_refused_at_load(tmp_path: Path) -> None:
    folder = tmp_path / "future"
    folder.mkdir()
    text = (builtin_dir() / "sysmon" / "plugin.toml").read_text().replace('api_version = "1"', 'api_version = "2"')
    (folder / "plugin.toml").write_text(text)
    with pytest.raises(ConfigError, match="api_version '2' is not a protocol version this TuxPilot speaks"):
        load_manifest(folder)


DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_the_written_protocol_lists_every_error_code_with_its_number() -> None:
    # The plugin's codes in the first table, the gate's reasons in the second.
    tables = DOC.read_text().split("\n| code | number |")[1:]
    row = re.compile(r"^\| `([a-z0-9_]+)` \| (\d{3}) \|", flags=re.M)
    found = [{code: int(n) for code, n in row.findall(table.split("\n\n")[0])} for table in tables]
    assert found == [PLUGIN_STATUS_CODES, GATE_STATUS_CODES]


def test_the_written_protocol_names_every_variable_the_host_sets() -> None:
    text = DOC.read_text()
    assert [name for name in sorted(launch.HOST_SET | {launch.NATS_USER_FILE}) if f"`{name}`" not in text] == []
    for name in launch.KEEP_ENV:
        assert f"`{name}`" in text
