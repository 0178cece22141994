"""Test helper with the shape of the anchor's ``docs/static/cfssl-helper.rb`` (exec mode).

Like that script it reads the request, parses ``inventory`` (JSON text), signs the CSR when
there is one, and prints ``defer``, ``msg``, ``certificate``, ``ca`` and a ``configuration``
holding the file security provider's paths under the node's ``ssldir``, ``identity``,
``registerinterval``, ``plugin.choria.middleware_hosts`` and the registration data file: it
never sets ``plugin.choria.server.provision``. It signs with the test CA instead of ``cfssl
sign -remote`` and adds the overlay broker's credentials ("include any other settings you wish
to set").

A node whose identity starts with ``stuck-`` gets ``plugin.choria.server.provision = true``: the
output the provisioner must refuse. Every request is appended to ``--record`` as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ca_adapters import LocalCA, SignRequest


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ca-dir", required=True)
    p.add_argument("--overlay-url", required=True)
    p.add_argument("--overlay-user", default="")
    p.add_argument("--overlay-password-file", default="")
    p.add_argument("--record", required=True)
    args = p.parse_args()

    request = json.loads(sys.stdin.read())
    request["inventory"] = json.loads(request["inventory"])
    with open(args.record, "a", encoding="utf-8") as f:
        f.write(json.dumps(request) + "\n")

    reply: dict[str, object] = {
        "defer": False,
        "msg": "",
        "certificate": "",
        "ca": "",
        "configuration": {},
    }
    configuration: dict[str, str] = {}
    identity = request["identity"]
    csr = request.get("csr") or {}
    if csr.get("csr"):
        try:
            d = Path(args.ca_dir)
            ca = LocalCA.from_files(d / "ca.pem", d / "ca-key.pem")
            signed = ca.sign_sync(SignRequest(identity=identity, csr_pem=csr["csr"]))
            reply["ca"] = ca.chain_pem
            reply["certificate"] = signed.certificate_pem
            ssldir = csr.get("ssldir", "")
            configuration.update(
                {
                    "plugin.security.provider": "file",
                    "plugin.security.file.certificate": f"{ssldir}/certificate.pem",
                    "plugin.security.file.key": f"{ssldir}/private.pem",
                    "plugin.security.file.ca": f"{ssldir}/ca.pem",
                    "plugin.security.file.cache": f"{ssldir}/cache",
                }
            )
        except Exception as exc:  # the Ruby script's rescue: defer with the reason
            reply["defer"] = True
            reply["msg"] = f"signing failed: {type(exc).__name__}: {exc}"
    configuration.update(
        {
            "identity": identity,
            "registerinterval": "300",
            "plugin.choria.middleware_hosts": args.overlay_url,
            "plugin.choria.registration.file_content.data": "/etc/node/metadata.json",
        }
    )
    if args.overlay_user:
        configuration["plugin.nats.user"] = args.overlay_user
        configuration["plugin.nats.pass"] = (
            Path(args.overlay_password_file).read_text().strip()
            if args.overlay_password_file
            else ""
        )
    if identity.startswith("stuck-"):
        configuration["plugin.choria.server.provision"] = "true"
    reply["configuration"] = configuration
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
