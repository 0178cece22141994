#!/usr/bin/env python3
"""A lean, anchor-compatible exec helper that signs through CFSSL's ``/authsign``.

It is written against the raw helper contract with the standard library only (no SDK, no
third-party imports), so it starts in a few milliseconds: in ``exec`` mode the provisioner
starts one helper process per node, and interpreter start-up plus imports dominate the cost
(the full reference helper imports pydantic, httpx and cryptography: ~250 ms of CPU per node).
Run it with ``python3 -S -E`` to skip site initialisation too.

Settings come from the environment (the provisioner passes its environment to helpers):

=========================  ==============================================================
``CFSSL_URL``              e.g. ``http://127.0.0.1:8888`` (required; ``https://`` works too)
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

import base64
import hashlib
import hmac
import http.client
import json
import os
import sys
import urllib.parse
from typing import Any, NoReturn


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"cfssl_authsign: {message}\n")
    sys.exit(1)


def post(url: str, path: str, body: bytes, timeout: float) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_cls(parts.netloc, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        fail(f"{path}: HTTP {resp.status}, not JSON")
    if not answer.get("success"):
        errors = "; ".join(str(e.get("message")) for e in answer.get("errors") or [])
        fail(f"{path}: HTTP {resp.status}: {errors or 'refused'}")
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
    token = base64.b64encode(hmac.new(key, raw, hashlib.sha256).digest()).decode()
    envelope = json.dumps({"token": token, "request": base64.b64encode(raw).decode()}).encode()
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
