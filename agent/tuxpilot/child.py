"""What a child process TuxPilot starts (a plugin, the embedded nats-server) does between fork and
exec: die with its parent, take its rlimits."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1

# A manifest limit, the rlimit it becomes, and the factor to the kernel's unit.
RLIMITS: dict[str, tuple[int, int]] = {
    "memory_mb": (resource.RLIMIT_AS, 1024 * 1024),
    "cpu_s": (resource.RLIMIT_CPU, 1),
    "open_files": (resource.RLIMIT_NOFILE, 1),
    "processes": (resource.RLIMIT_NPROC, 1),
}


@functools.cache
def _prctl() -> Callable[..., int]:
    # Loaded in the parent: the child only calls it, never loads a library after fork.
    prctl: Callable[..., int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return prctl


def child_setup(limits: dict[str, int]) -> Callable[[], None]:
    """What the child runs between fork and exec.

    CPython's _posixsubprocess calls `preexec_fn` after setgroups/setregid/setreuid, so this runs as the
    plugin's user. The kernel clears the parent-death signal on a credential change: it must be armed
    here, after the switch, or a SIGKILLed agent would leave its plugins running. Then the rlimits,
    soft = hard, so the plugin cannot raise them again (never above the agent's own hard limit).
    Kept small: it runs in a forked copy of a threaded process.
    """
    parent = os.getpid()
    prctl = _prctl()
    pairs = [(RLIMITS[name][0], value * RLIMITS[name][1]) for name, value in limits.items()]

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the agent died before the signal was armed
            os._exit(1)
        for which, value in pairs:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))

    return setup
