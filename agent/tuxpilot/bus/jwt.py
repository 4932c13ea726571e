"""NATS operator-mode identities: nkeys and the JWTs (claims v2) that nats-server verifies.

Written by hand over the NATS project's `nkeys` package: the claims are a small JSON document, and
the one Python JWT library (`nats-jwt` 0.2.2) cannot express what a fleet rests on, the account's
*scoped* signing keys (its `SigningKeys` is a set of bare public keys, no role or template), while it
pulls four more dependencies (dacite, dataclasses-json, pycryptodome, pytz).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
NO_LIMIT = -1
# What nats-server reads as "no limit" for an account: JetStream enabled with no cap.
UNLIMITED_ACCOUNT = {
    "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT, "exports": NO_LIMIT,
    "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT,
}
UNLIMITED_JETSTREAM = {"mem_storage": NO_LIMIT, "disk_storage": NO_LIMIT, "streams": NO_LIMIT, "consumer": NO_LIMIT}
UNLIMITED_USER = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT}

# nkeys and PyNaCl (libsodium) are imported where keys are used: an agent outside operator mode
# never loads them (1.1 MB of RSS).
_PREFIX = {"operator": "PREFIX_BYTE_OPERATOR", "account": "PREFIX_BYTE_ACCOUNT", "user": "PREFIX_BYTE_USER"}


@dataclass(frozen=True)
class Key:
    """An nkey: its seed (the secret) and its public key."""

    seed: str

    @classmethod
    def new(cls, kind: str) -> Key:
        import nkeys

        return cls(nkeys.encode_seed(os.urandom(32), getattr(nkeys, _PREFIX[kind])).decode())

    @property
    def public(self) -> str:
        import nkeys

        return str(nkeys.from_seed(self.seed.encode()).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        import nkeys

        return bytes(nkeys.from_seed(self.seed.encode()).sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], signer: Key) -> str:
    """Sign `claims` (with `sub`, `name`, `nats`) as `signer`: sets iss, iat and the jti hash."""
    body = {**claims, "iss": signer.public, "iat": int(time.time()), "jti": ""}
    # The jti is the hash of the claims without it, as the Go library computes it.
    digest = hashlib.new("sha512_256", json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signing_input = _b64(json.dumps(HEADER).encode()) + "." + _b64(json.dumps(body, separators=(",", ":")).encode())
    return signing_input + "." + _b64(signer.sign(signing_input.encode()))


def decode(token: str) -> dict[str, Any]:
    """The claims of a JWT whose signature verifies against its own issuer; ValueError otherwise."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        head, body, sig = token.split(".")
        claims: dict[str, Any] = json.loads(_unb64(body))
        # A public nkey is base32(prefix byte, 32-byte Ed25519 key, crc16).
        raw = base64.b32decode(claims["iss"] + "=" * (-len(claims["iss"]) % 8))[1:33]
        VerifyKey(raw).verify(f"{head}.{body}".encode(), _unb64(sig))
    except (ValueError, KeyError, TypeError, BadSignatureError) as exc:
        raise ValueError(f"not a valid NATS JWT: {exc}") from None
    return claims


def operator_jwt(operator: Key, name: str, system_account: str) -> str:
    return encode({"sub": operator.public, "name": name,
                   "nats": {"type": "operator", "version": 2, "system_account": system_account}}, operator)


@dataclass(frozen=True)
class Scope:
    """A scoped signing key of an account: every user it signs gets exactly `template`'s permissions,
    whatever the user JWT says; nats-server enforces it (`{{name()}}` is the user's name)."""

    key: str
    role: str
    publish: list[str]
    subscribe: list[str]
    allow_responses: bool = False
    description: str = ""
    deny_publish: tuple[str, ...] = ()  # carved out of `publish` (nats-server checks deny after allow)

    def claim(self) -> dict[str, Any]:
        pub: dict[str, Any] = {"allow": self.publish}
        if self.deny_publish:
            pub["deny"] = list(self.deny_publish)
        template: dict[str, Any] = {"pub": pub, "sub": {"allow": self.subscribe}, **UNLIMITED_USER}
        if self.allow_responses:
            template["resp"] = {"max": 1, "ttl": 0}
        return {"kind": "user_scope", "key": self.key, "role": self.role, "template": template,
                "description": self.description}


def account_jwt(account: Key, operator: Key, name: str, *, jetstream: bool, scopes: list[Scope] | None = None,
                revocations: dict[str, int] | None = None) -> str:
    limits = {**UNLIMITED_ACCOUNT, **(UNLIMITED_JETSTREAM if jetstream else {})}
    nats: dict[str, Any] = {"type": "account", "version": 2, "limits": limits,
                            "default_permissions": {"pub": {}, "sub": {}}}
    if scopes:
        nats["signing_keys"] = [scope.claim() for scope in scopes]
    if revocations:
        nats["revocations"] = revocations
    return encode({"sub": account.public, "name": name, "nats": nats}, operator)


def user_jwt(user: Key, signer: Key, name: str, *, account: str | None = None, publish: list[str] | None = None,
             subscribe: list[str] | None = None, tags: list[str] | None = None) -> str:
    """A user signed by the account itself (`account` None) or by one of its signing keys (`account` is
    the account's public key). Under a scoped key the permissions come from the scope, not from here."""
    nats: dict[str, Any] = {"type": "user", "version": 2}
    if publish is not None or subscribe is not None:
        # nats-server refuses a user of a scoped key that sets any permission or limit of its own.
        nats.update({**UNLIMITED_USER, "pub": {"allow": publish or []}, "sub": {"allow": subscribe or []}})
    if account is not None:
        nats["issuer_account"] = account
    if tags:
        nats["tags"] = tags
    return encode({"sub": user.public, "name": name, "nats": nats}, signer)


def creds(token: str, seed: str) -> str:
    """The `.creds` file every NATS client reads (nats.py's `user_credentials`, `nats --creds`)."""
    return (
        "-----BEGIN NATS USER JWT-----\n" f"{token}\n" "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n" f"{seed}\n" "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def mint_creds(signer: Key, name: str, *, account: str | None = None, publish: list[str] | None = None,
               subscribe: list[str] | None = None) -> str:
    """A new user's `.creds`: a fresh user nkey, its JWT signed by `signer`."""
    user = Key.new("user")
    return creds(user_jwt(user, signer, name, account=account, publish=publish, subscribe=subscribe), user.seed)
