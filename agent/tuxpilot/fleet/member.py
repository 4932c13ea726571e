"""An enrolled host's side: mint its users' credentials from its scoped signing keys.

Users minted here need nothing from the server: the fleet account already names the keys that sign
them, and the keys' templates set what each may do. A new user costs one Ed25519 signature.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuxpilot.bus import jwt
from tuxpilot.bus.jwt import Key
from tuxpilot.fleet import scopes
from tuxpilot.fleet.admin import Enrollment
from tuxpilot.protocol.errors import ConfigError
from tuxpilot.protocol.names import Subjects

CREDS_DIR = "credentials"


def load_enrollment(path: Path) -> Enrollment:
    try:
        return Enrollment.model_validate_json(path.read_text())
    except OSError as exc:
        raise ConfigError(f"fleet.enrollment {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"fleet.enrollment {path}: not an enrolment file ({exc})") from None


def mint(enrollment: Enrollment, role: str, plugin: str | None = None) -> str:
    """A fresh user of `role` (for `plugin`) on the enrolled host, as `.creds` text."""
    subjects = Subjects(enrollment.prefix, enrollment.host)
    signer = Key(enrollment.keys[role])
    return jwt.mint_creds(signer, scopes.user_name(role, subjects, plugin), account=enrollment.account)


def forget_creds(state_dir: Path, plugin: str) -> None:
    """A removed plugin's minted `.creds`, deleted (the key that signed it mints no other)."""
    (state_dir / CREDS_DIR / f"plugin-{plugin}.creds").unlink(missing_ok=True)


def write_creds(state_dir: Path, enrollment: Enrollment, role: str, plugin: str | None = None) -> Path:
    """Mint and write a user's `.creds` (0600) under the state dir; returns its path."""
    name = scopes.user_name(role, Subjects(enrollment.prefix, enrollment.host), plugin)
    path = state_dir / CREDS_DIR / f"{role}-{name}.creds"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(mint(enrollment, role, plugin))
    os.chmod(path, 0o600)
    return path
