"""`tuxpilot key`: publisher keys. `new` makes a signing key, `list` shows yours and the ones this host
trusts, `trust`/`untrust` edit the host's trust store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tuxpilot.cli.common import EXIT_FAILED, EXIT_USAGE, add_row, config_of, fail, out, table
from tuxpilot.pdk.keys import KeyRing, PublicKey, TrustStore
from tuxpilot.pdk.settings import signing_keys_dir, trusted_keys_dir
from tuxpilot.protocol.errors import ConfigError, NotFound

app = typer.Typer(help="Publisher keys: sign packages, trust publishers.", no_args_is_help=True)


@app.command("new")
def key_new(ctx: typer.Context, name: str) -> None:
    """Make an Ed25519 signing key NAME (the publisher name packages signed with it carry)."""
    config = config_of(ctx)
    ring = KeyRing(signing_keys_dir(config))
    try:
        signer = ring.new(name)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    out.print(f"signing key {signer.name} (id {signer.id}) written to {ring.path(name)}", markup=False)
    out.print("its public key, for `tuxpilot key trust` on the hosts that install your packages:", markup=False)
    out.print(signer.public.text, markup=False)


@app.command("list")
def key_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Your signing keys and the publishers this host trusts."""
    config = config_of(ctx)
    try:
        signing = KeyRing(signing_keys_dir(config)).all()
        trusted = TrustStore(trusted_keys_dir(config)).all()
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    rows = [{"kind": "signing", "name": s.name, "id": s.id, "public_key": s.public.text} for s in signing]
    rows += [{"kind": "trusted", "name": k.name, "id": k.id, "public_key": k.text} for k in trusted]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    grid = table("kind", "name", "id", "public key")
    for r in rows:
        add_row(grid, r["kind"], r["name"], r["id"], r["public_key"].split()[0])
    out.print(grid)
    out.print(f"signing keys: {signing_keys_dir(config)}; trusted keys: {trusted_keys_dir(config)}", markup=False)


@app.command("trust")
def key_trust(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The public key (`ed25519:… NAME`) or a file holding it.")],
    name: Annotated[str | None, typer.Option(help="The publisher's name here (default: the key's).")] = None,
) -> None:
    """Trust a publisher's public key: packages it signed verify and install on this host."""
    config = config_of(ctx)
    text = key
    if not key.startswith("ed25519:"):
        try:
            text = Path(key).read_text()
        except OSError as exc:
            fail(f"{key}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        public = PublicKey.parse(text.strip().splitlines()[0] if text.strip() else "", name)
        added = TrustStore(trusted_keys_dir(config)).trust(public)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    state = "now trusted" if added else "was trusted already"
    out.print(f"{public.name} (key {public.id}) {state} in {trusted_keys_dir(config)}", markup=False)


@app.command("untrust")
def key_untrust(ctx: typer.Context, key: Annotated[str, typer.Argument(help="The key's id or name.")]) -> None:
    """Stop trusting a publisher's key (installed plugins stay; new packages it signed are refused)."""
    config = config_of(ctx)
    try:
        removed = TrustStore(trusted_keys_dir(config)).untrust(key)
    except NotFound as exc:
        fail(exc.message, EXIT_FAILED)
    except ConfigError as exc:
        fail(exc.message, EXIT_USAGE)
    out.print(f"{removed.name} (key {removed.id}) is no longer trusted", markup=False)
