"""`provisioner jwt` commands: make key pairs, create, view and verify provisioning tokens.

Secrets stay off screens and out of process lists where we can help it: ``view`` masks ``cht``
and ``chpwd``, ``create`` accepts ``--token-file``/``--password-file`` so the secret need not be
on the command line, and private keys and tokens are written 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from choria_core.durations import parse_duration
from jwt_tools import (
    TokenError,
    create_provisioning_token,
    decode_unverified,
    generate_keypair,
    load_signing_key,
    load_verify_key,
    redact_claims,
    verify_provisioning_token,
    write_private_file,
    write_public_file,
)
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail

app = typer.Typer(
    help="Create, view and verify provisioning tokens.",
    no_args_is_help=True,
)

_TIME_CLAIMS = ("iat", "nbf", "exp", "issexp")
_CLAIM_HELP = {
    "cht": "provisioning token (shared secret)",
    "chs": "secure protocol",
    "chu": "broker URLs",
    "chsrv": "SRV domain",
    "chpd": "provision by default",
    "chrd": "registration data file",
    "chf": "facts file",
    "chusr": "broker username",
    "chpwd": "broker password",
    "extensions": "extensions",
    "ou": "organisation",
    "v2": "protocol v2",
    "update": "allow release_update",
    "purpose": "purpose",
    "sub": "subject",
    "iss": "issuer",
    "iat": "issued at",
    "nbf": "not before",
    "exp": "expires",
    "jti": "token id",
}


def _console() -> Console:
    # wide tables so claims are not folded; soft_wrap keeps plain lines on one line
    return Console(width=160, soft_wrap=True)


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise fail(f"could not read the {what} file {path}: {exc.strerror}", EXIT_USAGE) from None
    if not value:
        raise fail(f"the {what} file {path} is empty", EXIT_USAGE)
    return value


@app.command("keys")
def keys_cmd(
    key_type: str = typer.Option("rsa", "--type", help="Key type: rsa or ed25519."),
    out_private: Path = typer.Option(..., "--out-private", help="Private key file (written 0600)."),
    out_public: Path = typer.Option(..., "--out-public", help="Public key file."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Generate a signing key pair for provisioning tokens."""
    if key_type not in ("rsa", "ed25519"):
        raise fail(f"unknown key type {key_type!r}; use rsa or ed25519", EXIT_USAGE)
    for p in (out_private, out_public):
        if p.exists() and not force:
            raise fail(f"{p} exists; pass --force to overwrite it", EXIT_USAGE)
    priv, pub = generate_keypair("rsa" if key_type == "rsa" else "ed25519")
    write_private_file(out_private, priv)
    write_public_file(out_public, pub)
    c = _console()
    c.print(f"Wrote {key_type} private key to {out_private} (mode 0600)", highlight=False)
    c.print(f"Wrote {key_type} public key to {out_public}", highlight=False)
    if key_type == "ed25519":
        c.print(f"Public key: {pub.decode()}", highlight=False)


@app.command("create")
def create_cmd(
    out: Path = typer.Argument(..., help="Where to write the token (mode 0600)."),
    signing_key: Path = typer.Option(
        ..., "--signing-key", help="RSA private key PEM or ed25519 seed (64 hex) file."
    ),
    token: str | None = typer.Option(
        None, "--token", help="The provisioning token secret (cht). Prefer --token-file."
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Read the provisioning token secret from this file."
    ),
    urls: str | None = typer.Option(
        None, "--urls", help="Comma-separated broker URLs (nats://host:port or host:port)."
    ),
    srv: str | None = typer.Option(None, "--srv", help="SRV domain (exclusive with --urls)."),
    validity: str = typer.Option("1y", "--validity", help="Token validity, e.g. 30d, 1y."),
    default: bool = typer.Option(
        False, "--default", help="Enable provisioning by default on the node (chpd)."
    ),
    insecure: bool = typer.Option(
        True,
        "--insecure/--secure",
        help="Insecure (chs=false, the Choria default) or secure protocol for the node.",
    ),
    facts: str | None = typer.Option(None, "--facts", help="Facts file path on the node (chf)."),
    registration: str | None = typer.Option(
        None, "--registration", help="Registration data file path on the node (chrd)."
    ),
    username: str | None = typer.Option(None, "--username", help="Broker username (chusr)."),
    password: str | None = typer.Option(None, "--password", help="Broker password (chpwd)."),
    password_file: Path | None = typer.Option(
        None, "--password-file", help="Read the broker password from this file."
    ),
    extensions: str | None = typer.Option(
        None, "--extensions", help="Extensions as a JSON object."
    ),
    org: str = typer.Option("choria", "--org", help="Organisation (ou)."),
    protocol_v2: bool = typer.Option(False, "--protocol-v2", help="Use protocol v2 (v2)."),
    update: bool = typer.Option(False, "--update", help="Allow release_update (update)."),
    issuer: str = typer.Option("fleet-provisioner", "--issuer", help="Issuer (iss)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Create a signed provisioning token (provisioning.jwt)."""
    if (token is None) == (token_file is None):
        raise fail("give exactly one of --token or --token-file", EXIT_USAGE)
    secret = token if token_file is None else _read_secret_file(token_file, "token")
    if not secret:
        raise fail("the provisioning token secret must not be empty", EXIT_USAGE)
    if password is not None and password_file is not None:
        raise fail("give at most one of --password or --password-file", EXIT_USAGE)
    if password_file is not None:
        password = _read_secret_file(password_file, "password")
    if (urls is None) == (srv is None):
        raise fail("give exactly one of --urls or --srv", EXIT_USAGE)
    try:
        validity_s = parse_duration(validity)
    except ValueError as exc:
        raise fail(f"--validity: {exc}", EXIT_USAGE) from None
    ext: dict[str, Any] | None = None
    if extensions is not None:
        try:
            parsed = json.loads(extensions)
        except ValueError:
            raise fail("--extensions must be a JSON object", EXIT_USAGE) from None
        if not isinstance(parsed, dict):
            raise fail("--extensions must be a JSON object", EXIT_USAGE)
        ext = parsed
    if out.exists() and not force:
        raise fail(f"{out} exists; pass --force to overwrite it", EXIT_USAGE)
    try:
        key = load_signing_key(signing_key)
    except TokenError as exc:
        raise fail(f"--signing-key: {exc} ({exc.reason})", EXIT_USAGE) from None
    try:
        jwt_text = create_provisioning_token(
            key,
            token=secret,
            urls=[u for u in (urls or "").split(",") if u.strip()],
            srv=srv,
            validity_s=validity_s,
            default=default,
            secure=not insecure,
            facts=facts,
            registration=registration,
            username=username,
            password=password,
            extensions=ext,
            org=org,
            protocol_v2=protocol_v2,
            update=update,
            issuer=issuer,
        )
    except TokenError as exc:
        raise fail(f"{exc} ({exc.reason})", EXIT_FAILED) from None
    write_private_file(out, jwt_text.encode())
    _, claims = decode_unverified(jwt_text)
    _console().print(
        f"Wrote provisioning token to {out} (mode 0600), expires {_fmt_time(claims['exp'])}",
        highlight=False,
    )


def _fmt_time(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:  # a token being viewed is unverified: its times may be anything
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value)) + f" ({int(value)})"
        except (OverflowError, OSError, ValueError):
            return f"{str(value)[:32]} (out of range)"
    return str(value)[:256]


def _fmt(key: str, value: Any) -> str:
    if key in _TIME_CLAIMS:
        return _fmt_time(value)
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(
            f"could not read the token file {path}: {exc.__class__.__name__}", EXIT_FAILED
        ) from None


@app.command("view")
def view_cmd(
    token_file: Path = typer.Argument(..., help="The token file."),
    as_json: bool = typer.Option(False, "--json", help="Print the (masked) claims as JSON."),
) -> None:
    """Show a token's claims (unverified; secrets masked). Use `verify` to check it."""
    try:
        header, claims = decode_unverified(_read_token(token_file))
    except TokenError as exc:
        raise fail(f"{token_file}: {exc} ({exc.reason})", EXIT_FAILED) from None
    shown = redact_claims(claims)
    if as_json:
        typer.echo(json.dumps({"header": header, "claims": shown}, indent=2, sort_keys=True))
        return
    table = Table(title=f"{token_file} (not verified)", show_lines=False)
    table.add_column("Claim", no_wrap=True)
    table.add_column("Meaning", no_wrap=True)
    table.add_column("Value", overflow="fold")
    table.add_row("alg", "signing algorithm (header)", str(header.get("alg")))
    ordered = [k for k in _CLAIM_HELP if k in shown] + sorted(
        k for k in shown if k not in _CLAIM_HELP
    )
    for k in ordered:
        table.add_row(k, _CLAIM_HELP.get(k, ""), _fmt(k, shown[k]))
    _console().print(table, highlight=False)


@app.command("verify")
def verify_cmd(
    token_file: Path = typer.Argument(..., help="The token file."),
    verify_key: str = typer.Option(
        ...,
        "--verify-key",
        help="Certificate PEM, public key PEM or ed25519 hex public key (file, or inline hex).",
    ),
) -> None:
    """Verify a provisioning token. Exit 0 when valid, 1 (with the reason) when not.

    An unusable --verify-key exits 2 (bad usage): nothing was verified.
    """
    try:
        key = load_verify_key(verify_key)
    except TokenError as exc:
        raise fail(f"--verify-key: {exc} ({exc.reason})", EXIT_USAGE) from None
    try:
        claims = verify_provisioning_token(_read_token(token_file), key)
    except TokenError as exc:
        raise fail(
            f"{token_file}: invalid token: {exc} (reason: {exc.reason})", EXIT_FAILED
        ) from None
    where = f"chu={claims['chu']}" if claims.get("chu") else f"chsrv={claims.get('chsrv')}"
    expires = _fmt_time(claims["exp"]) if "exp" in claims else "never"
    _console().print(
        f"{token_file}: valid provisioning token ({where}, ou={claims.get('ou')}, "
        f"expires {expires})",
        highlight=False,
    )


# ------------------------------------------------------------------------ token governance
# `revoke` and `revoked` talk to the token governance KV bucket directly. The provisioner keeps
# it in the PROVISIONING account (--config: the provisioner's broker, user and TLS), the auth
# callout in the AUTH account (--callout-config: broker-auth.yaml's servers and nkey seed);
# give both to revoke a token at both enforcement points.

_CONFIG_OPT = typer.Option(
    None, "--config", "-c", help="The provisioner YAML (its broker and token_governance.bucket)."
)
_CALLOUT_OPT = typer.Option(
    None, "--callout-config", help="The auth callout's broker-auth.yaml (the AUTH account)."
)
_TIMEOUT_OPT = typer.Option(5.0, "--timeout", help="Seconds to wait for the broker.")


async def _governance_buckets(
    config: Path | None, callout_config: Path | None, timeout: float
) -> list[tuple[str, Any, Any]]:
    """(where, connection, KV bucket) for each configuration given."""
    import nats

    from provisioner import connection
    from provisioner.broker.callout_config import CalloutConfigError, load_callout_config
    from provisioner.config import ConfigError, load_config
    from provisioner.token_governance import open_bucket

    if config is None and callout_config is None:
        raise fail("give --config (provisioner) and/or --callout-config (auth callout)", EXIT_USAGE)
    targets: list[tuple[str, Any, str]] = []
    try:
        if config is not None:
            cfg = load_config(config)
            nc = await asyncio.wait_for(
                connection.connect(
                    cfg, name="provisioner-jwt", is_running=lambda: False, on_reconnect=lambda: None
                ),
                timeout * 4,
            )
            targets.append(("provisioner", nc, cfg.token_governance.bucket))
        if callout_config is not None:
            cc = load_callout_config(callout_config)
            tls = ssl.create_default_context(cafile=cc.tls_ca) if cc.tls_ca else None
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=cc.servers, nkeys_seed_str=cc.auth_user_seed, tls=tls,
                    name="provisioner-jwt", allow_reconnect=False, connect_timeout=timeout,
                ),
                timeout * 4,
            )  # fmt: skip
            targets.append(("callout", nc, cc.token_governance.bucket))
        out = []
        for where, nc, bucket in targets:
            out.append((where, nc, await open_bucket(nc.jetstream(timeout=timeout), bucket)))
        return out
    except (ConfigError, CalloutConfigError) as exc:
        await _close_all(targets)
        raise fail(f"invalid configuration: {exc}", EXIT_USAGE) from None
    except Exception as exc:  # nats-py names the server, never a password or seed
        await _close_all(targets)
        raise fail(f"token bucket unavailable: {type(exc).__name__}: {exc}", EXIT_FAILED) from None


async def _close_all(targets: Any) -> None:
    for _, nc, _ in targets:
        with contextlib.suppress(Exception):
            await nc.close()


async def _revoke(
    jti: str, reason: str | None, undo: bool, buckets: list[tuple[str, Any, Any]]
) -> None:
    from provisioner.token_governance import revoke, unrevoke

    by = f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        for where, _, kv in buckets:
            if undo:
                lifted = await unrevoke(kv, jti)
                typer.echo(f"{where}: " + ("revocation lifted" if lifted else "was not revoked"))
            else:
                await revoke(kv, jti, reason or "", by=by)
                typer.echo(f"{where}: revoked")
    except Exception as exc:
        raise fail(f"could not write the token bucket: {type(exc).__name__}", EXIT_FAILED) from None
    finally:
        await _close_all(buckets)


@app.command("revoke")
def revoke_cmd(
    jti: str = typer.Argument(..., help="The token's id (jti; `jwt view` shows it)."),
    reason: str | None = typer.Option(None, "--reason", help="Why (required to revoke)."),
    undo: bool = typer.Option(False, "--undo", help="Lift the revocation of JTI instead."),
    config: Path | None = _CONFIG_OPT,
    callout_config: Path | None = _CALLOUT_OPT,
    timeout: float = _TIMEOUT_OPT,
) -> None:
    """Revoke a provisioning token by its JTI, or lift the revocation with --undo.

    Every provisioner and auth callout with token_governance enabled refuses it within ~1 s.
    """
    from provisioner.token_governance import check_jti

    if not undo and not (reason and reason.strip()):
        raise fail("--reason TEXT is required to revoke a token", EXIT_USAGE)
    try:
        check_jti(jti)
    except ValueError as exc:
        raise fail(f"JTI: {exc}", EXIT_USAGE) from None

    async def run() -> None:
        await _revoke(jti, reason, undo, await _governance_buckets(config, callout_config, timeout))

    asyncio.run(run())


@app.command("revoked")
def revoked_cmd(
    config: Path | None = _CONFIG_OPT,
    callout_config: Path | None = _CALLOUT_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON list."),
    timeout: float = _TIMEOUT_OPT,
) -> None:
    """List the revoked provisioning tokens (JTI, reason, when, by whom, where)."""
    from provisioner.token_governance import list_revoked

    async def run() -> list[dict[str, Any]]:
        buckets = await _governance_buckets(config, callout_config, timeout)
        merged: dict[str, dict[str, Any]] = {}
        try:
            for where, _, kv in buckets:
                for rec in await list_revoked(kv, timeout):
                    merged.setdefault(rec.jti, {**rec.to_json(), "where": []})["where"].append(
                        where
                    )
        except Exception as exc:
            raise fail(
                f"could not read the token bucket: {type(exc).__name__}", EXIT_FAILED
            ) from None
        finally:
            await _close_all(buckets)
        return sorted(merged.values(), key=lambda r: (r["revoked_at"], r["jti"]))

    rows = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps(rows, sort_keys=True))
        return
    if not rows:
        typer.echo("no revoked tokens")
    for r in rows:
        when = _fmt_time(r["revoked_at"])
        typer.echo(
            f"{r['jti']}  {when}  by {r['by'] or '-'}  [{','.join(r['where'])}]  {r['reason']}"
        )
