"""The `container` runtime: the plugin is an OCI image the host runs on the Docker engine (`DOCKER_HOST`)
with the hardening flags, the HOST's manifest and the plugin's own credential file.

The plugin host supervises one small process per container plugin (`python -m tuxpilot.runtimes.container_run`,
run as the agent's user, since the engine's socket is root's): it creates and starts the container,
streams its output, waits for it, and stops and removes it when it is told to stop or its parent dies. So
backoff, crash loops and stopping work exactly as for a process plugin, and no container outlives its
agent. The container runs as the plugin's own user (uid:gid), read-only, with no capabilities, and with
no network but the bus (container_relay) unless the host granted `network_access`.

How the manifest maps: `memory_mb` becomes the cgroup memory limit (swap included), `processes` the pids
limit, `cpu_s` and `open_files` the container's RLIMIT_CPU and RLIMIT_NOFILE (the same meaning as for a
process plugin), and `[plugins.<name>] cpus` (default 1) its CPU share.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tuxpilot.protocol import launch
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import Manifest
from tuxpilot.runtimes import container_relay
from tuxpilot.runtimes.base import Launch, Runtime
from tuxpilot.runtimes.container_run import SPEC as SPEC  # the name the standing process reads

if TYPE_CHECKING:
    from tuxpilot.runtimes.confine import Account

RUN_MODULE = "tuxpilot.runtimes.container_run"
# Where the container finds its credential file (mounted read-only).
CREDENTIAL_MOUNT = "/run/tuxpilot/credentials"
TMPFS = "rw,nosuid,nodev,noexec,size=64m,mode=1777"
# Of the host's launch environment, what makes sense inside the container: the TUXPILOT_* settings and
# the locale, never the host's PATH, PYTHONPATH or DOCKER_HOST.
KEEP = ("LANG", "LC_ALL", "TZ")
# Host paths in the environment that the container gets as read-only mounts at the same path.
TLS_FILES = tuple(launch.env_name("nats", key) for key in ("tls_ca", "tls_cert", "tls_key"))
LABEL_HOST, LABEL_PLUGIN = "org.tuxpilot.host", "org.tuxpilot.plugin"
PING_TIMEOUT_S = 3.0
LOAD_TIMEOUT_S = 300.0
MAX_TARBALL_MANIFEST = 1024 * 1024


class ImageError(TuxPilotError):
    code = "unavailable"


def _client(timeout: float = PING_TIMEOUT_S) -> Any:
    import docker  # only where a container plugin is loaded

    return docker.from_env(timeout=timeout)


class Container(Runtime):
    name: ClassVar[str] = "container"
    on_host: ClassVar[bool] = False

    def missing(self, folder: Path, manifest: Manifest, path: str) -> str | None:
        if importlib.util.find_spec("docker") is None:
            return "the docker Python package is not installed (pip install docker)"
        try:
            client = _client()
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # docker raises its own and requests' errors; all mean "no engine"
            where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            return f"no Docker engine answers at {where} ({type(exc).__name__})"
        return None

    def launch(self, folder: Path, manifest: Manifest, limits: dict[str, int], path: str) -> Launch:
        # No rlimits on the process standing for the container: the limits are the container's.
        spec = {"image": manifest.image, "limits": limits, "manifest": manifest.to_doc()}
        # It talks to the engine, whose socket is root's: it runs as the agent, the container as the plugin.
        return Launch([sys.executable, "-m", RUN_MODULE, str(folder)], {SPEC: json.dumps(spec)}, {}, as_agent=True)

    def needs(self, folder: Path, manifest: Manifest) -> list[tuple[Path, int]]:
        return []  # the plugin's user reads nothing of the host's but its credential file, which is mounted

    async def prepare(self, folder: Path, manifest: Manifest, log: Any) -> None:
        await asyncio.to_thread(ensure_image, folder, manifest, log)

    async def install(self, folder: Path, manifest: Manifest, log: Any) -> None:
        # A package's image is made from what the package carries, even when the engine has one of that name:
        # the signed tarball or Dockerfile is what the publisher vouched for, not whatever holds the tag.
        await asyncio.to_thread(ensure_image, folder, manifest, log, fresh=True)

    async def uninstall(self, folder: Path, manifest: Manifest, log: Any) -> None:
        await asyncio.to_thread(remove_image, manifest, log)


def is_build_file(entry_point: str) -> bool:
    """Whether the entry point is a Dockerfile (the plugin's folder is then the build context) rather than
    a tarball `docker load` takes."""
    name = Path(entry_point).name
    return name.endswith(("Dockerfile", "Containerfile"))


def tarball_tags(path: Path) -> list[str]:
    """The tags a `docker save` tarball gives the images it holds (its manifest.json's RepoTags), read before
    loading it: `docker load` re-points every one of them."""
    try:
        with tarfile.open(path) as tar:
            member = tar.getmember("manifest.json")
            data = tar.extractfile(member) if member.isfile() and member.size <= MAX_TARBALL_MANIFEST else None
            if data is None:
                raise ImageError(f"{path}: its manifest.json is not a small regular file")
            doc = json.loads(data.read())
        return [str(t) for entry in doc for t in (entry.get("RepoTags") or [])]
    except KeyError:
        raise ImageError(f"{path} holds no manifest.json: not a tarball of `docker save`") from None
    except (tarfile.TarError, OSError, ValueError, AttributeError, TypeError) as exc:
        raise ImageError(f"{path}: not a readable tarball of `docker save` ({type(exc).__name__})") from None


def ensure_image(folder: Path, manifest: Manifest, log: Any, *, fresh: bool = False) -> None:
    """The engine has the manifest's image, or gets it from the plugin's entry point: a tarball it loads,
    or a Dockerfile it builds with the plugin's folder as context and no network; else the plugin cannot
    start, which is said once instead of a crash loop. `fresh`: made from the entry point even when the
    engine has an image of that name (an install: the package's image, not the engine's)."""
    import docker.errors

    assert manifest.image is not None
    client = _client(LOAD_TIMEOUT_S)
    try:
        try:
            if not fresh:
                client.images.get(manifest.image)
                return
        except docker.errors.ImageNotFound:
            pass
        entry = folder / manifest.entry_point
        build = is_build_file(manifest.entry_point)
        if not entry.is_file():
            what = "a Dockerfile to build it from" if build else "a tarball for docker load"
            raise ImageError(f"the engine has no image {manifest.image} and {entry} ({what}) does not exist")
        if build:
            log.info("plugin.image_build", image=manifest.image, dockerfile=str(entry))
            client.images.build(path=str(folder), dockerfile=manifest.entry_point, tag=manifest.image,
                                network_mode="none", rm=True, forcerm=True)
            log.info("plugin.image_built", image=manifest.image)
            return
        held = tarball_tags(entry)
        if held != [manifest.image]:  # loading it would re-point other tags too
            raise ImageError(f"{entry} holds {', '.join(held) or 'no tagged image'}, not {manifest.image} alone")
        log.info("plugin.image_load", image=manifest.image, tarball=str(entry))
        with entry.open("rb") as data:
            loaded = client.images.load(data)
        tags = [t for image in loaded for t in image.tags]
        if manifest.image not in tags:
            raise ImageError(f"{entry} holds {', '.join(tags) or 'no tagged image'}, not {manifest.image}")
        log.info("plugin.image_loaded", image=manifest.image)
    except docker.errors.BuildError as exc:
        raise ImageError(f"building {manifest.image} from {manifest.entry_point} failed: {exc.msg}") from None
    except docker.errors.DockerException as exc:
        raise ImageError(f"the Docker engine refused the image {manifest.image}: {exc}") from None
    finally:
        client.close()


def remove_image(manifest: Manifest, log: Any) -> None:
    """The image an installed version ran, untagged (its layers deleted when nothing else uses them). Kept,
    with a warning, while a container still uses it or the engine is away: the next start needs nothing of it."""
    import docker.errors

    assert manifest.image is not None
    try:
        client = _client()
    except docker.errors.DockerException as exc:
        log.warning("plugin.image_kept", image=manifest.image, why=str(exc))
        return
    try:
        client.images.remove(manifest.image)
        log.info("plugin.image_removed", image=manifest.image)
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.DockerException as exc:
        log.warning("plugin.image_kept", image=manifest.image, why=str(exc))
    finally:
        client.close()


def container_name(host: str, plugin: str) -> str:
    """One container per plugin and host: a leftover of a crashed agent is found, and removed, by name."""
    return f"tuxpilot-{host}-{plugin}"


def network_mode(granted_network: bool, tls: bool) -> str:
    """The container's network. The engine runs without a bridge or iptables: a container shares the
    host's network or has none. With `network_access` granted it gets the host's; without, none at all,
    and the bus through a relay into its own namespace (container_relay). Under TLS the host's too: the
    server's certificate names the host's address, not the relay's."""
    # Entering the container's namespace takes CAP_SYS_ADMIN: an agent that is not root shares the host's.
    return "host" if granted_network or tls or os.geteuid() != 0 else "none"


@dataclass(frozen=True)
class ContainerSpec:
    """What the host decided for one plugin's container."""

    name: str
    image: str
    user: str  # uid:gid
    manifest: dict[str, Any]
    limits: dict[str, int] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)
    credential: str | None = None
    cpus: float = 1.0
    network: str = "host"
    labels: dict[str, str] = field(default_factory=dict)


def environment(spec: ContainerSpec, env: dict[str, str]) -> dict[str, str]:
    """The container's environment: the plugin's launch environment with the paths it has in there."""
    inside = {k: v for k, v in env.items() if (k.startswith(launch.ENV_PREFIX) or k in KEEP) and k != SPEC}
    for key in (launch.NATS_USER_FILE, launch.env_name("nats", "creds")):
        if key in inside:
            inside[key] = credential_path(spec)
    if spec.network == "none":  # the bus through the relay into its own namespace, and nothing else
        inside[launch.NATS_URL] = container_relay.URL
    inside[launch.STATE_DIR] = "/tmp"
    inside["HOME"] = "/tmp"
    # The manifest the HOST loaded: the container serves and announces this one, not one of its own.
    inside[launch.MANIFEST] = json.dumps(spec.manifest, separators=(",", ":"))
    return inside


def credential_path(spec: ContainerSpec) -> str:
    suffix = os.path.splitext(spec.credential or "")[1]
    return CREDENTIAL_MOUNT + suffix


def create_options(spec: ContainerSpec, env: dict[str, str]) -> dict[str, Any]:
    """docker-py's `containers.create` keywords for the spec (JSON, for the process standing for the
    container): the hardening flags and the limits."""
    limits = spec.limits
    volumes = {}
    if spec.credential is not None:
        volumes[spec.credential] = {"bind": credential_path(spec), "mode": "ro"}
    for key in TLS_FILES:
        if env.get(key):
            volumes[env[key]] = {"bind": env[key], "mode": "ro"}
    ulimits = [{"name": n, "soft": limits[k], "hard": limits[k]}
               for k, n in (("cpu_s", "cpu"), ("open_files", "nofile")) if k in limits]
    options: dict[str, Any] = {
        "name": spec.name,
        "environment": environment(spec, env),
        "user": spec.user,
        "group_add": [str(g) for g in spec.groups],
        "read_only": True,
        "tmpfs": {"/tmp": TMPFS},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "network_mode": spec.network,
        "volumes": volumes,
        "ulimits": ulimits,
        "nano_cpus": int(spec.cpus * 1e9),
        "init": True,  # a real PID 1: signals forwarded, zombies reaped
        "labels": spec.labels,
        "detach": True,
    }
    if "memory_mb" in limits:
        options["mem_limit"] = options["memswap_limit"] = limits["memory_mb"] * 2**20
    if "processes" in limits:
        options["pids_limit"] = limits["processes"]
    return options


def run_spec(spec: ContainerSpec, env: dict[str, str]) -> str:
    """What the process standing for the container is handed (TUXPILOT_CONTAINER): everything decided,
    so that it needs nothing but the docker SDK."""
    return json.dumps({
        "image": spec.image, "options": create_options(spec, env), "relay": spec.network == "none",
        "upstreams": env.get(launch.NATS_URL, ""),
    })


def host_spec(spec: str, *, host: str, plugin: str, account: Account | None, credential: Path | None,
              cpus: float, network: str, env: dict[str, str]) -> str:
    """The launch's spec (image, limits, manifest) with what only the host knows — who the container runs
    as (the plugin's own user, else the agent's), its credential file, its CPU share, its network, its
    name and labels — as the process standing for the container takes it. `env`: the plugin's launch
    environment."""
    doc = json.loads(spec)
    if account is not None:
        user, groups = f"{account.uid}:{account.gid}", [g for g in account.groups if g != account.gid]
    else:
        user, groups = f"{os.getuid()}:{os.getgid()}", []
    decided = ContainerSpec(
        name=container_name(host, plugin), image=doc["image"], user=user, manifest=doc["manifest"],
        limits=doc["limits"], groups=groups, credential=str(credential) if credential is not None else None,
        cpus=cpus, network=network, labels={LABEL_HOST: host, LABEL_PLUGIN: plugin},
    )
    return run_spec(decided, env)
