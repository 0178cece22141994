"""Broker isolation for unprovisioned nodes: nats-server config and the auth callout.

- :mod:`provisioner.broker.config`: ``provisioner broker config`` (nats-server config, callout
  config, secrets, TLS).
- :mod:`provisioner.broker.callout`: ``provisioner broker auth``, the auth callout service.
"""

from provisioner.broker.callout import (
    CalloutConfig,
    CalloutService,
    CalloutStats,
    Refused,
    load_callout_config,
    node_permissions,
)
from provisioner.broker.config import BrokerFiles, generate_broker_config

__all__ = [
    "BrokerFiles",
    "CalloutConfig",
    "CalloutService",
    "CalloutStats",
    "Refused",
    "generate_broker_config",
    "load_callout_config",
    "node_permissions",
]
