"""Confinement of plugin processes: the unprivileged user a plugin runs as, whether that user can reach
what the plugin needs, its rlimits (the manifest's, within the host's maxima), and what the child does
between fork and exec."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from tuxpilot.child import RLIMITS, child_setup
from tuxpilot.protocol.errors import TuxPilotError
from tuxpilot.protocol.manifest import Limits, Manifest
from tuxpilot.runtimes.base import run_as
from tuxpilot.runtimes.catalog import runtime_of
from tuxpilot.runtimes.python import PROCESS_MODULE
from tuxpilot.runtimes.settings import ConfinementConfig, HostSettings

log = structlog.get_logger("tuxpilot.confine")

# Where useradd lives; the agent's own PATH may not name sbin.
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
# What the probe imports: the module a Python plugin process starts with.
PROBE_IMPORT = f"import {PROCESS_MODULE}"

PYTHON_FIX = (
    "install TuxPilot where {user} can read and run it (a virtualenv under /opt or /usr/local, not under "
    "/root), or set confinement.user = \"root\" to run plugins as root knowingly"
)
RUNTIME_FIX = "install the runtime where {user} can run it, or set confinement.user = \"root\" knowingly"
PATH_FIX = "make the directory traversable for {user} (chmod o+x DIR) or move state_dir (default /var/lib/tuxpilot)"


@dataclass(frozen=True)
class Account:
    """A user a plugin process runs as: uid, primary gid, and every group the process gets."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def find_account(name: str, groups: Iterable[str] = ()) -> tuple[Account | None, list[str]]:
    """The account `name` with its primary group and `groups`; also the groups that do not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None, []
    gids, missing = [entry.pw_gid], []
    for group in groups:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            missing.append(group)
            continue
        if gid not in gids:
            gids.append(gid)
    return Account(name, entry.pw_uid, entry.pw_gid, tuple(gids)), missing


def create_user(name: str) -> None:
    """Create `name` as a package's postinst would: a system user with no home and no login shell."""
    useradd = shutil.which("useradd", path=SBIN_PATH)
    if useradd is None:
        raise TuxPilotError(f"user {name} does not exist and useradd is not installed", code="unavailable")
    try:
        grp.getgrnam(name)
        group = ["--gid", name]
    except KeyError:
        group = ["--user-group"]
    argv = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", *group, name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0 and find_account(name)[0] is None:
        raise TuxPilotError(f"useradd {name} failed: {done.stderr.strip()[:500]}", code="unavailable")


# -- can the user get there? ----------------------------------------------------------------------


def may(st: os.stat_result, account: Account, bits: int) -> bool:
    """Whether `account` has `bits` (os.R_OK | os.W_OK | os.X_OK) on a file of this stat, by its mode bits
    as the kernel checks them: the owner's, else the group's, else everyone else's. ACLs are not read."""
    if account.is_root:
        return True
    mode = st.st_mode
    if st.st_uid == account.uid:
        granted = (mode >> 6) & 7
    elif st.st_gid in account.groups:
        granted = (mode >> 3) & 7
    else:
        granted = mode & 7
    return granted & bits == bits


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


_VERBS = {os.R_OK: "read", os.W_OK: "write", os.X_OK: "run"}


def unreachable(path: Path, account: Account, bits: int) -> str | None:
    """Why `account` cannot use `path` for `bits`, or None: every directory on the way must let it through."""
    real = Path(os.path.realpath(path))
    try:
        for directory in reversed(real.parents):
            st = os.stat(directory)
            if not may(st, account, os.X_OK):
                return (f"{directory} is mode {stat.S_IMODE(st.st_mode):04o} owned by {_owner(st)}: "
                        f"{account.name} cannot pass through it")
        st = os.stat(real)
    except FileNotFoundError:
        return f"{real} does not exist"
    except OSError as exc:
        return f"{exc.filename}: {exc.strerror}"
    if not may(st, account, bits):
        wanted = "/".join(verb for bit, verb in _VERBS.items() if bits & bit)
        return f"{real} is mode {stat.S_IMODE(st.st_mode):04o} owned by {_owner(st)}: {account.name} cannot {wanted} it"
    return None


async def probe_python(python: str, account: Account, env: dict[str, str]) -> str | None:
    """Ask the kernel itself: can `account` start `python` and import TuxPilot? None, or why not."""
    return await run_as([python, "-c", PROBE_IMPORT], account, env)


# -- limits ---------------------------------------------------------------------------------------


def effective_limits(asked: Limits | None, cfg: ConfinementConfig) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """Each rlimit a plugin gets: its manifest's, else the host's default, never above the host's maximum.

    Returns the limits (manifest units: MiB, seconds, counts) and those cut down, as (asked, allowed).
    """
    limits: dict[str, int] = {}
    cut: dict[str, tuple[int, int]] = {}
    for name in RLIMITS:
        want: int | None = getattr(asked, name, None) if asked is not None else None
        if want is None:
            want = getattr(cfg.default_limits, name)
        cap: int | None = getattr(cfg.max_limits, name)
        if want is None:
            want = cap  # no limit asked for or by default: the maximum still holds
        elif cap is not None and want > cap:
            cut[name] = (want, cap)
            want = cap
        if want is not None:
            limits[name] = want
    return limits, cut


# -- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one plugin's process is started: as whom, with which limits, and why not confined if not."""

    account: Account | None  # None: as the agent's own user
    limits: dict[str, int] = field(default_factory=dict)
    unconfined: str | None = None  # why an agent running as root runs this plugin as root
    refused: str | None = None  # strict: why this plugin is not started at all
    fix: str | None = None

    @property
    def user(self) -> str:
        if self.account is not None:
            return self.account.name
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return str(os.geteuid())

    def spawn_options(self, rlimits: dict[str, int] | None = None, *, as_agent: bool = False) -> dict[str, Any]:
        """Keyword arguments for asyncio.create_subprocess_exec / subprocess.Popen. `rlimits`: the limits
        the plugin's runtime enforces as rlimits (all of them unless it says otherwise); `as_agent`: the
        process keeps the agent's user (it stands for a plugin that runs elsewhere as the plugin's user)."""
        options: dict[str, Any] = {"preexec_fn": child_setup(self.limits if rlimits is None else rlimits)}
        if self.account is not None and not as_agent:
            # Always name the groups: CPython calls setgroups only for a non-empty list, and the
            # plugin must not keep the agent's supplementary groups.
            options.update(user=self.account.uid, group=self.account.gid, extra_groups=list(self.account.groups))
        return options


class Confinement:
    """Decides, once per plugin, the user and rlimits its process runs with.

    As root, each plugin runs as a user of its own (`tuxpilot-p-<name>`, or the user the config names;
    created when missing) unless that user cannot reach what the plugin's runtime needs, the plugin's
    code or the state dir; then the plugin runs as root with a warning, or, with `confinement.strict`,
    not at all. What was learned (accounts, runtime probes) is kept.
    """

    def __init__(self, config: HostSettings):
        self.config = config
        self._lock = asyncio.Lock()
        self._probes: dict[tuple[tuple[str, ...], Account], str | None] = {}

    async def plan(
        self, name: str, folder: Path, manifest: Manifest, workdir: Path, credential: Path | None,
        env: dict[str, str],
    ) -> Plan:
        plog = log.bind(plugin=name, host=self.config.host_id)
        limits, cut = effective_limits(manifest.limits, self.config.confinement)
        for limit, (asked, allowed) in cut.items():
            plog.warning("plugin.limit_reduced", limit=limit, asked=asked, allowed=allowed,
                         why=f"confinement.max_limits.{limit} is {allowed}")
        if os.geteuid() != 0:
            return Plan(None, limits)  # nothing to drop: plugins run as the agent's user
        settings = self.config.plugin(name)
        user = self.config.plugin_user(name)
        async with self._lock:  # plugins start together: one useradd at a time
            try:
                account = await self._account(user, settings.groups, plog)
            except TuxPilotError as exc:
                return self._unconfined(limits, exc.message, f"create the user {user} by hand")
        if account.is_root:
            return self._unconfined(limits, f"the plugin user {user} is root",
                                    "set confinement.user to an unprivileged user, or unset it")
        problems = await self._reach(manifest, folder, workdir, credential, account, env)
        if problems:
            fixes = dict.fromkeys(fix.format(user=user) for _, fix in problems)
            return self._unconfined(limits, "; ".join(p for p, _ in problems), "; ".join(fixes))
        try:
            _hand_over(workdir, credential, account)
        except OSError as exc:
            return self._unconfined(limits, f"cannot hand {exc.filename} over to {user}: {exc.strerror}",
                                    PATH_FIX.format(user=user))
        return Plan(account, limits)

    def _unconfined(self, limits: dict[str, int], reason: str, fix: str) -> Plan:
        if self.config.confinement.strict:
            return Plan(None, limits, refused=reason, fix=f"{fix}; or set confinement.strict = false")
        return Plan(None, limits, unconfined=reason, fix=f"{fix}; or set confinement.strict = true to refuse")

    async def _account(self, user: str, groups: list[str], plog: Any) -> Account:
        account, missing = find_account(user, groups)
        if account is None:
            await asyncio.to_thread(create_user, user)
            plog.info("plugin.user_created", user=user, how="useradd --system --no-create-home")
            account, missing = find_account(user, groups)
            if account is None:
                raise TuxPilotError(f"user {user} was created but cannot be found", code="unavailable")
        for group in missing:
            plog.warning("plugin.group_missing", user=user, group=group)
        return account

    async def _reach(
        self, manifest: Manifest, folder: Path, workdir: Path, credential: Path | None, account: Account,
        env: dict[str, str],
    ) -> list[tuple[str, str]]:
        """What `account` cannot reach of what the plugin needs, each with its fix.

        The directories TuxPilot owns below the state dir are handed over once the answer is yes.
        """
        runtime = runtime_of(manifest)
        need: list[tuple[Path, int]] = []
        if runtime.on_host:
            need.append((workdir.parent.parent, os.X_OK))  # the state dir, and every directory above it
            if credential is not None:
                need.append((credential.parent.parent, os.X_OK))
        need += runtime.needs(folder, manifest)
        problems = [(p, PATH_FIX) for path, bits in dict.fromkeys(need) if (p := unreachable(path, account, bits))]
        argv = runtime.probe(env.get("PATH", ""))
        if argv is not None:
            key = (tuple(argv), account)
            if key not in self._probes:
                found = await run_as(argv, account, env)
                if found is not None:
                    hint = unreachable(Path(argv[0]), account, os.X_OK)
                    found = f"{found} ({hint})" if hint else found
                self._probes[key] = found
            probed = self._probes[key]
            if probed is not None:
                problems.insert(0, (probed, PYTHON_FIX if runtime.name == "python" else RUNTIME_FIX))
        return problems


def _hand_over(workdir: Path, credential: Path | None, account: Account) -> None:
    """Give the plugin's user its working dir and credential file, and a way to reach both.

    Only these paths, never recursively: a chown that followed what the plugin left in its dir
    (a symlink, a hard link) could hand it any file on the system.
    """
    os.chmod(workdir.parent, 0o711)  # plugins/: each may enter its own dir, none may list the others
    os.chown(workdir, account.uid, account.gid, follow_symlinks=False)
    os.chmod(workdir, 0o700)
    if credential is not None:
        os.chmod(credential.parent, 0o711)  # credentials/: files stay 0600, the others root's
        os.chown(credential, account.uid, account.gid, follow_symlinks=False)
        os.chmod(credential, 0o600)
