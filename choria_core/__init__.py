"""What the provisioner and the nodes both speak, below every other package.

The Choria v1 wire protocol (:mod:`choria_core.protocol`), the X25519 ECDH key transport
(:mod:`choria_core.ecdh`), NATS client helpers (:mod:`choria_core.natsconn`), atomic
tight-permission file writing (:mod:`choria_core.securefile`). This package imports nothing else
from the project; see ``docs/architecture.md`` for the layer rule.
"""
