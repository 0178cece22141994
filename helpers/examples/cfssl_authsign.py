#!/usr/bin/env python3
"""A lean, anchor-compatible exec helper that signs through CFSSL's ``/authsign``.

It is written against the raw helper contract with the standard library only (no SDK, no
third-party imports), so it starts in a few milliseconds: in ``exec`` mode the provisioner
starts one helper process per node, and interpreter start-up plus imports dominate the cost
(the full reference helper imports pydantic, httpx and cryptography: ~250 ms of CPU per node).
Run it with ``python3 -S -E`` to skip site initialisation too.

Settings come from the environment (list these names in the provisioner's ``helper_env``):

=========================  ==============================================================
``CFSSL_URL``              e.g. ``http://127.0.0.1:8888`` (required; ``https://`` works too)
``CFSSL_TLS_CA``           CA bundle to verify an https CFSSL with (default: system store)
``CFSSL_PROFILE``          signing profile with an ``auth_key`` (default ``node``)
``CFSSL_AUTH_KEY_FILE``    file holding the profile's hex HMAC key (required)
``CFSSL_LABEL``            multirootca label (optional)
``CFSSL_CA_FILE``          CA bundle to hand to nodes; fetched from ``/info`` when unset
``BROKERS``                comma-separated overlay broker URLs for the node (required)
``COLLECTIVES``            default ``choria``
``HTTP_TIMEOUT``           seconds, default 5
=========================  ==============================================================

Input: the helper JSON on stdin (``identity``, ``csr`` with ``csr``/``ssldir``, ...).
Output: ``certificate``, ``ca``, ``ssldir`` and a ``configuration`` that always sets
``plugin.choria.server.provision=false``. Any failure: a message on stderr and exit 1, which
the provisioner records; the node stays provisionable.
"""

from __future__ import annotations

import binascii
import hmac
import json
import os
import socket
import sys
from typing import Any, NoReturn


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"cfssl_authsign: {message}\n")
    sys.exit(1)


def post(url: str, path: str, body: bytes, timeout: float) -> dict[str, Any]:
    """POST JSON and return cfssl's ``result``.

    A minimal HTTP/1.0 client on a plain socket: ``http.client`` alone costs ~40 ms of imports
    (email, ssl), more than the rest of this helper. HTTP/1.0 keeps the answer unchunked and
    delimited by the server closing the connection. ``ssl`` is imported only for https.
    """
    scheme, _, rest = url.partition("://")
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("["):  # [v6]:port
        host, _, port_text = hostport[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = hostport.partition(":")
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        if scheme == "https":
            import ssl

            cafile = os.environ.get("CFSSL_TLS_CA") or None
            sock = ssl.create_default_context(cafile=cafile).wrap_socket(sock, server_hostname=host)
        with sock:
            head = (
                f"POST {path} HTTP/1.0\r\nHost: {hostport}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        fail(f"{path}: cannot reach {hostport}: {exc}")
    status_line, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status = status_line.split(b"\r\n", 1)[0].decode("latin-1")
    try:
        answer = json.loads(payload)
    except ValueError:
        fail(f"{path}: {status}, not JSON")
    if not answer.get("success"):
        errors = "; ".join(str(e.get("message")) for e in answer.get("errors") or [])
        fail(f"{path}: {status}: {errors or 'refused'}")
    result = answer.get("result")
    if not isinstance(result, dict):
        fail(f"{path}: no result in the answer")
    return result


def main() -> None:
    env = os.environ
    url = env.get("CFSSL_URL") or fail("CFSSL_URL is not set")
    key_file = env.get("CFSSL_AUTH_KEY_FILE") or fail("CFSSL_AUTH_KEY_FILE is not set")
    brokers = env.get("BROKERS") or fail("BROKERS is not set")
    profile = env.get("CFSSL_PROFILE", "node")
    label = env.get("CFSSL_LABEL")
    timeout = float(env.get("HTTP_TIMEOUT", "5"))

    try:
        request = json.load(sys.stdin)
        identity = request["identity"]
        csr = request["csr"]["csr"]
        ssldir = request["csr"].get("ssldir") or "/etc/choria/ssl"
    except (ValueError, KeyError, TypeError):
        fail("input is not a helper request with identity and csr (is the pki feature on?)")

    try:
        with open(key_file) as fh:
            key = bytes.fromhex(fh.read().strip())
    except (OSError, ValueError):
        fail(f"cannot read a hex HMAC key from {key_file}")

    sign = {"certificate_request": csr, "hosts": [identity], "profile": profile}
    if label:
        sign["label"] = label
    raw = json.dumps(sign).encode()
    # binascii, not base64: the base64 module costs ~5 ms of imports per exec
    token = binascii.b2a_base64(hmac.digest(key, raw, "sha256"), newline=False).decode()
    request_b64 = binascii.b2a_base64(raw, newline=False).decode()
    envelope = json.dumps({"token": token, "request": request_b64}).encode()
    certificate = post(url, "/api/v1/cfssl/authsign", envelope, timeout).get("certificate")
    if not certificate:
        fail("authsign returned no certificate")

    ca_file = env.get("CFSSL_CA_FILE")
    if ca_file:
        with open(ca_file) as fh:
            ca = fh.read()
    else:
        info = {"profile": profile, **({"label": label} if label else {})}
        ca = post(url, "/api/v1/cfssl/info", json.dumps(info).encode(), timeout)["certificate"]

    json.dump(
        {
            "defer": False,
            "msg": f"signed by cfssl profile {profile}",
            "certificate": certificate,
            "ca": ca,
            "ssldir": ssldir,
            "configuration": {
                "identity": identity,
                "plugin.choria.server.provision": "false",
                "plugin.choria.middleware_hosts": brokers,
                "collectives": env.get("COLLECTIVES", "choria"),
                "main_collective": env.get("COLLECTIVES", "choria").split(",")[0],
                "plugin.security.provider": "file",
                "plugin.security.file.certificate": f"{ssldir}/certificate.pem",
                "plugin.security.file.key": f"{ssldir}/private.pem",
                "plugin.security.file.ca": f"{ssldir}/ca.pem",
            },
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
