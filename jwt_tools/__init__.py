"""Choria JWTs: provisioning tokens, server tokens and the keys that sign and verify them.

``jwt_tools.nats_jwt`` (NATS nkeys/JWT helpers for the auth callout) is a separate module and
is deliberately not imported here.
"""

from jwt_tools.chain import (
    ChainIssuer,
    chain_issuer_fields,
    current_chain_issuer,
    load_chain_issuer,
    parse_chain_issuer,
)
from jwt_tools.keys import (
    KeyFileError,
    SigningKey,
    VerifyKey,
    generate_keypair,
    load_signing_key,
    load_verify_key,
    load_verify_keys,
    public_key_hex,
    write_private_file,
    write_public_file,
)
from jwt_tools.server_tokens import (
    SERVER_PERMISSIONS,
    create_server_token,
    parse_server_token_unverified,
    verify_chain,
    verify_server_token,
)
from jwt_tools.tokens import (
    ALLOWED_ALGORITHMS,
    DEFAULT_LEEWAY_S,
    DEFAULT_MAX_LIFETIME_S,
    PROVISIONING_PURPOSE,
    SECRET_CLAIMS,
    SERVER_PURPOSE,
    TokenError,
    create_provisioning_token,
    decode_unverified,
    ksuid_timestamp,
    new_ksuid,
    parse_provisioning_token_unverified,
    redact_claims,
    verify_provisioning_token,
)

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_LEEWAY_S",
    "DEFAULT_MAX_LIFETIME_S",
    "PROVISIONING_PURPOSE",
    "SECRET_CLAIMS",
    "SERVER_PERMISSIONS",
    "SERVER_PURPOSE",
    "ChainIssuer",
    "KeyFileError",
    "SigningKey",
    "TokenError",
    "VerifyKey",
    "chain_issuer_fields",
    "create_provisioning_token",
    "create_server_token",
    "current_chain_issuer",
    "decode_unverified",
    "generate_keypair",
    "ksuid_timestamp",
    "load_chain_issuer",
    "load_signing_key",
    "load_verify_key",
    "load_verify_keys",
    "new_ksuid",
    "parse_chain_issuer",
    "parse_provisioning_token_unverified",
    "parse_server_token_unverified",
    "public_key_hex",
    "redact_claims",
    "verify_chain",
    "verify_provisioning_token",
    "verify_server_token",
    "write_private_file",
    "write_public_file",
]
