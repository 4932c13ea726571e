"""Whether this host can run a plugin: its manifest's `api_version`, its runtime, and its `dependencies`
(system commands with version ranges, Python distributions, other plugins, TuxPilot itself).

Version ranges are comma- or space-separated clauses, all of which must hold: `>=1.2`, `<2`, `==1.4`
(`==1.4` is any 1.4.x), `!=1.3.0`, `^1.2.3` (same major, or same minor below 1.0), `~1.2.3` (same
minor), `*`. A bare version is `==`. Pre-releases sort before their release.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from importlib import metadata

from tuxpilot.protocol.manifest import API_VERSIONS, Dependency, Manifest

# Commands are looked up where the command helper looks (sdk/command.py), never on the caller's PATH.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
COMMAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?")
CLAUSE = re.compile(r"(>=|<=|==|!=|>|<|=|\^|~)?\s*v?(\d+(?:\.\d+){0,2}(?:-[0-9A-Za-z.-]+)?)")
PROBE_TIMEOUT_S = 5.0

Key = tuple[int, int, int, tuple[tuple[int, int | str], ...]]


def version_key(text: str) -> Key:
    """A sortable key for a (semver-like) version: 1.10 > 1.9, 1.0.0-rc.1 < 1.0.0."""
    found = VERSION.match(text.strip().lstrip("v"))
    if not found:
        raise ValueError(f"not a version: {text!r}")
    major, minor, patch, pre = found.groups()
    # A release sorts after every pre-release of it: (1,) after (0, …).
    tail: tuple[tuple[int, int | str], ...] = (
        tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split(".")) if pre else ((2, 0),)
    )
    return int(major), int(minor or 0), int(patch or 0), tail


def _parts(text: str) -> int:
    return len(text.split("-", 1)[0].split("."))


def satisfies(version: str, spec: str | None) -> bool:
    """Whether `version` is in the range `spec` (None, "" and "*" are any version)."""
    if not spec or spec.strip() == "*":
        return True
    have = version_key(version)
    clauses = list(CLAUSE.finditer(spec))
    if not clauses or CLAUSE.sub("", spec).strip(" ,\t*"):
        raise ValueError(f"not a version range: {spec!r}")
    for found in clauses:
        op, want_text = found.group(1) or "==", found.group(2)
        want = version_key(want_text)
        if op in ("==", "="):
            n = _parts(want_text)
            ok = have[:n] == want[:n] and ("-" not in want_text or have == want)
        elif op == "!=":
            ok = have != want
        elif op == ">=":
            ok = have >= want
        elif op == ">":
            ok = have > want
        elif op == "<=":
            ok = have <= want
        elif op == "<":
            ok = have < want
        elif op == "^":
            bound = (want[0] + 1, 0, 0) if want[0] > 0 else (0, want[1] + 1, 0)
            ok = want <= have and have[:3] < bound
        else:  # ~
            ok = want <= have and have[:2] == want[:2]
        if not ok:
            return False
    return True


def command_version(program: str) -> str | None:
    """The first version number `program --version` prints (stdout or stderr), or None."""
    try:
        done = subprocess.run([program, "--version"], capture_output=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, env={"PATH": SAFE_PATH, "LANG": "C"}, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(rb"\d+\.\d+(?:\.\d+)?", done.stdout[:65536] + b"\n" + done.stderr[:65536])
    return found.group().decode() if found else None


def _own_version() -> str:
    try:
        return metadata.version("tuxpilot")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _range(dep: Dependency) -> str:
    return f" {dep.version}" if dep.version else ""


def _check_one(dep: Dependency, installed: Mapping[str, Manifest], path: str,
               probe: Callable[[str], str | None]) -> str | None:
    """Why `dep` is not met, or None."""
    kind = dep.kind or ("plugin" if dep.name in installed else "system")
    try:
        if dep.name == "tuxpilot" and kind == "system":
            have = _own_version()
            return None if satisfies(have, dep.version) else f"needs TuxPilot{_range(dep)}, this is {have}"
        if kind == "plugin":
            other = installed.get(dep.name)
            if other is None:
                return f"needs plugin {dep.name}{_range(dep)}, which is not installed"
            if not satisfies(other.version, dep.version):
                return f"needs plugin {dep.name}{_range(dep)}, installed is {other.version}"
            return None
        if kind == "python":
            try:
                have = metadata.version(dep.name)
            except metadata.PackageNotFoundError:
                return f"needs Python package {dep.name}{_range(dep)}, which is not installed"
            return None if satisfies(have, dep.version) else f"needs Python package {dep.name}{_range(dep)}, " \
                                                              f"installed is {have}"
        if kind == "npm":
            return None  # installed from the plugin's own lockfile when it is prepared
        if not COMMAND.match(dep.name):
            return f"dependency {dep.name!r} is not a command name"
        program = shutil.which(dep.name, path=path)
        if program is None:
            return f"needs command {dep.name}{_range(dep)}, not found on {path}"
        if not dep.version:
            return None
        have_text = probe(program)
        if have_text is None:
            return f"needs command {dep.name}{_range(dep)}; `{dep.name} --version` names no version"
        return None if satisfies(have_text, dep.version) else f"needs command {dep.name}{_range(dep)}, " \
                                                               f"found {have_text}"
    except ValueError as exc:
        return f"dependency {dep.name}: {exc}"


def check(manifest: Manifest, *, installed: Mapping[str, Manifest], runtimes: Mapping[str, str | None],
          path: str = SAFE_PATH, probe: Callable[[str], str | None] = command_version) -> list[str]:
    """Every unmet requirement of `manifest` on this host, one line each (empty: all met).

    `installed`: the plugins installed here, by name (a plugin replacing itself should not be in it).
    `runtimes`: each runtime this host knows, mapped to None when it can run plugins, else why not.
    """
    problems: list[str] = []
    if manifest.api_version not in API_VERSIONS:
        problems.append(f"needs plugin API version {manifest.api_version}; this TuxPilot speaks "
                        f"{', '.join(sorted(API_VERSIONS))}")
    if manifest.runtime not in runtimes:
        problems.append(f"runtime {manifest.runtime} is not one this host knows")
    elif runtimes[manifest.runtime] is not None:
        problems.append(f"runtime {manifest.runtime} cannot run here: {runtimes[manifest.runtime]}")
    for dep in manifest.dependencies:
        problem = _check_one(dep, installed, path, probe)
        if problem:
            problems.append(problem)
    return problems


def require(manifest: Manifest, *, installed: Mapping[str, Manifest], runtimes: Mapping[str, str | None],
            path: str = SAFE_PATH) -> None:
    """`check`, raising PackageRefused with every unmet requirement on one line."""
    from tuxpilot.pdk.package import PackageRefused

    problems = check(manifest, installed=installed, runtimes=runtimes, path=path)
    if problems:
        raise PackageRefused(f"{manifest.name} {manifest.version}: {'; '.join(problems)}")
